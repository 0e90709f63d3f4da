"""The registry of pruning methods: name -> implementation, one interface.

Add a method by subclassing `PruningMethod` (or `RankedMethod` when its kept sets
are prefixes of image-only rankings) and listing it in `METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hero_core.config import check_field_values
from hero_core.errors import ConfigError, UnknownMethodError
from hero_core.methods.base import PruningMethod, RankedMethod, Ranking, select_prefixes
from hero_core.methods.baselines import FasterVLM, Full, Random
from hero_core.methods.guided import GlobalCom2, Hired
from hero_core.methods.hero import Hero, HeroConfig
from hero_core.methods.visionzip import VisionZip

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (Hero, Full, Random, FasterVLM, Hired, VisionZip, GlobalCom2)
}


def create_method(name: str, **overrides: Any) -> PruningMethod:
    """Instantiate method `name` with its default config, changing `overrides` fields."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown pruning method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"{name} has no setting {', '.join(unknown)}; its settings are "
                          f"{', '.join(sorted(known)) or 'none'}")
    check_field_values(cls.Config, overrides)
    return cls(dataclasses.replace(cls.Config(), **overrides))


__all__ = [
    "METHODS",
    "HeroConfig",
    "PruningMethod",
    "RankedMethod",
    "Ranking",
    "create_method",
    "select_prefixes",
]
