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
from typing import Any

from hero_core.errors import ConfigError


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
