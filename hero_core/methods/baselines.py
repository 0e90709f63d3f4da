"""Reference points: no pruning, random tokens, and FasterVLM's per-crop CLS ranking."""

from __future__ import annotations

import dataclasses

import torch

from hero_core.budget import allocate, round_half_up, total_budget
from hero_core.config import require
from hero_core.encoder import EncodedCrops
from hero_core.methods.base import PruningMethod, RankedMethod, Ranking, rank_valid
from hero_core.packing import Selection
from hero_core.tiling import TileGrid


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """No settings: every unpadded token is kept whatever the ratio."""


class Full(RankedMethod):
    """No pruning: exactly the stock LLaVA-NeXT tokens (the ratio is ignored)."""

    name = "full"
    Config = FullConfig

    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        valid = grid.valid_mask()
        return Ranking([torch.nonzero(v).flatten() for v in valid], {})

    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        return ranking.caps


@dataclasses.dataclass(frozen=True)
class RandomConfig:
    """Uniformly random tokens: the floor any informed method must beat."""

    seed: int = 0
    """Seed of the generator; the same image and ratio always keep the same tokens."""


class Random(PruningMethod):
    """`round(R * 576 * crops)` tokens drawn uniformly from all valid tokens of the image."""

    name = "random"
    Config = RandomConfig
    config: RandomConfig

    def select(self, crops: EncodedCrops, grid: TileGrid, ratio: float,
               question: torch.Tensor | None) -> Selection:
        valid = grid.valid_mask()
        pool = torch.nonzero(valid.flatten()).flatten()
        budget = min(total_budget(ratio, grid.tokens_per_crop, grid.num_crops), pool.numel())
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = pool[torch.randperm(pool.numel(), generator=generator)[:budget]]
        per_crop = grid.tokens_per_crop
        return Selection([chosen[chosen // per_crop == i] % per_crop
                          for i in range(grid.num_crops)])


@dataclasses.dataclass(frozen=True)
class FasterVLMConfig:
    """FasterVLM: rank by the CLS attention of a late layer, same count per crop."""

    layer: int = 22
    """Layer whose CLS attention ranks the tokens."""

    def __post_init__(self) -> None:
        require(self.layer >= 0, "FasterVLMConfig.layer must be >= 0")


class FasterVLM(RankedMethod):
    """Each crop keeps its top `round(R * 576)` valid tokens by CLS attention; what a
    crop cannot take (padding) goes to the other crops by largest remainder."""

    name = "fastervlm"
    Config = FasterVLMConfig
    config: FasterVLMConfig

    def attention_layers(self) -> tuple[int, ...]:
        return (self.config.layer,)

    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        scores, valid = crops.attention[self.config.layer], grid.valid_mask()
        return Ranking([rank_valid(scores[i].cpu(), valid[i]) for i in range(grid.num_crops)], {})

    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        per_crop = round_half_up(ratio * grid.tokens_per_crop)
        budget = total_budget(ratio, grid.tokens_per_crop, grid.num_crops)
        caps = [min(per_crop, c) for c in ranking.caps]
        return allocate(min(budget, sum(caps)), [1.0] * len(caps), caps)
