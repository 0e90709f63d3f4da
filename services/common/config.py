"""Service configuration: one pydantic model per service, from YAML plus environment.

Precedence, lowest first: the model's defaults, the YAML file, environment variables
named `PREFIX` + field name in upper case (nested fields joined by `__`, e.g.
`HERO_LANGUAGE_LIMITS__MAX_NEW_TOKENS`). Read once in `main()` and passed down.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


def env_overrides(model: type[BaseModel], prefix: str, environ: Mapping[str, str]
                  ) -> dict[str, Any]:
    """Nested dict of the environment variables that name fields of `model`."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name.upper()}"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            nested = env_overrides(sub, key + "__", environ)
            if nested:
                out[name] = nested
        elif key in environ:
            out[name] = _parse(environ[key])
    return out


def _parse(value: str) -> Any:
    # YAML scalars give lists ("[a, b]"), booleans and numbers; pydantic checks types.
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(model: type[ModelT], path: Path | None, prefix: str,
                environ: Mapping[str, str]) -> ModelT:
    """Defaults < YAML file at `path` < environment; validated by `model`."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a YAML mapping")
        data = loaded
    return model.model_validate(merge(data, env_overrides(model, prefix, environ)))
