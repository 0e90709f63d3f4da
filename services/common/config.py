"""Service configuration: one pydantic-settings model per service.

Precedence, lowest first: the model's defaults, the YAML file (or, for the vision
service, the Serve config's application `args`), then environment variables named
`PREFIX` + field name (nested fields joined by `__`, e.g.
`HERO_LANGUAGE_LIMITS__MAX_NEW_TOKENS`). Values from the environment are parsed by
pydantic, field by field: `no` is a string where a string is expected; lists and
mappings are JSON (`HERO_LANGUAGE_ACCEPTED_DTYPES='["float16", "int8"]'`). Secrets are
`SecretStr` fields, filled from the environment (a Kubernetes secret) and never
printed. Unknown keys in the file are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Base of the services' settings; a subclass sets `env_prefix` in its `model_config`."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid",
                                      case_sensitive=False)

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The first source wins: the environment beats the file's values (passed to the
        # constructor), which beat the defaults.
        return env_settings, init_settings

    @classmethod
    def load(cls, path: Path | None = None, values: Mapping[str, Any] | None = None) -> Self:
        """Defaults < the YAML file at `path` < `values` < the process environment."""
        data = read_yaml(path) if path is not None else {}
        return cls(**deep_merge(data, dict(values or {})))


def read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a YAML mapping")
    return loaded


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, mappings merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def secret_value(secret: SecretStr | None) -> str | None:
    """The secret's text; None when unset or empty."""
    return (secret.get_secret_value() if secret is not None else "") or None
