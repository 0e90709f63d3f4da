"""Configuration shared by every part of hero_core.

Configs are frozen dataclasses validated in `__post_init__`. Fields that change the
output of a computation take part in `compute_hash()`; fields marked
`metadata={"hash": False}` (limits, devices) do not, so a cache keyed on the hash is
never split by a setting that cannot change the tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any

from hero_core.errors import ConfigError

METHOD_NAMES = ("hero", "full", "random", "fastervlm", "hired", "visionzip", "globalcom2")
"""The pruning methods' names (`hero_core.methods.METHODS` has their classes), here so a
command line can list them without importing torch."""


def compute_config_hash(config: Any) -> str:
    """A 16-hex-digit fingerprint of the output-affecting fields of a dataclass.

    The class name is part of the hash, so two methods with equal fields differ.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("hash", True)
    }
    blob = json.dumps([type(config).__name__, fields], sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_field_values(config_cls: type, values: dict[str, Any]) -> None:
    """Raise `ConfigError` unless each value has the type its field of `config_cls`
    declares (int, finite float, bool, str, or None where allowed); values from a command
    line or a config file are checked before the config validates their ranges."""
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        allowed = _allowed(hints[name])
        if allowed and not any(_is(value, kind) for kind in allowed):
            what = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in allowed)
            raise ConfigError(f"{name} must be {what}, got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "true or false",
               str: "a string", type(None): "null"}


def _allowed(hint: Any) -> tuple[type, ...]:
    """The plain classes a field's annotation admits; () when it is not that simple."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = tuple(_allowed(h) for h in typing.get_args(hint))
        return () if any(not k for k in kinds) else tuple(c for k in kinds for c in k)
    return (hint,) if hint in _KIND_NAMES else ()


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Input limits enforced before any model work; each violation names its field."""

    max_image_bytes: int = 32 * 1024 * 1024
    """Largest encoded image accepted, in bytes."""
    max_image_pixels: int = 50_000_000
    """Largest decoded image (width x height); guards against decompression bombs."""
    max_prompt_chars: int = 16_384
    """Longest question or prompt accepted, in characters."""

    def __post_init__(self) -> None:
        require(self.max_image_bytes > 0, "Limits.max_image_bytes must be positive")
        require(self.max_image_pixels > 0, "Limits.max_image_pixels must be positive")
        require(self.max_prompt_chars > 0, "Limits.max_prompt_chars must be positive")


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Settings of the calibration; all of them change the curves or the suggestion."""

    norm_std_factor: float = 3.0
    """k: a token is high-norm when its hidden-state norm > mean + k * std (per image, layer)."""
    top_k: int = 10
    """Size of the CLS-attention top sets compared across layers."""
    reference_layers: int = 2
    """How many final layers' mean CLS row defines the reference top-k set."""
    share_min: float = 0.5
    """The artifact stage starts where at least this share of CLS attention is on
    high-norm tokens."""
    batch_size: int = 4
    """Images per tower pass (bounds memory, not results)."""

    def __post_init__(self) -> None:
        require(self.norm_std_factor > 0, "norm_std_factor must be > 0")
        require(self.top_k > 0, "top_k must be > 0")
        require(self.reference_layers > 0, "reference_layers must be > 0")
        require(0.0 < self.share_min <= 1.0, "share_min must be in (0, 1]")
        require(self.batch_size > 0, "batch_size must be > 0")
