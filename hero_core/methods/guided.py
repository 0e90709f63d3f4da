"""Thumbnail-guided baselines: HiRED and GlobalCom2 split the tile budget by where the
thumbnail's CLS attention falls, then rank each crop by its own late CLS attention.

Both map thumbnail tokens to tiles in 2-D (`TileGrid.thumbnail_tile_map`) and select
among unpadded tokens only. HiRED's public code maps regions as horizontal bands and
selects before unpadding; this implementation does neither, on purpose.
"""

from __future__ import annotations

import dataclasses

import torch

from hero_core.budget import allocate, round_half_up, total_budget
from hero_core.config import require
from hero_core.encoder import EncodedCrops
from hero_core.methods.base import RankedMethod, Ranking, rank_valid
from hero_core.tiling import TileGrid


def rank_crops(scores: torch.Tensor, grid: TileGrid) -> list[torch.Tensor]:
    """Every crop's valid tokens by descending `scores` `(K+1, T)`."""
    valid = grid.valid_mask()
    return [rank_valid(scores[i].cpu(), valid[i]) for i in range(grid.num_crops)]


@dataclasses.dataclass(frozen=True)
class HiredConfig:
    """HiRED (high-resolution early dropping) settings."""

    thumbnail_share: float = 0.5
    """`alpha`: the thumbnail's share of the budget."""
    guide_layer: int = 0
    """Layer whose thumbnail CLS attention decides how the tiles split their budget."""
    guide_fraction: float = 0.25
    """Share of thumbnail tokens (top by guide-layer attention) counted per tile region."""
    select_layer: int = 22
    """Layer whose CLS attention ranks tokens inside each crop."""

    def __post_init__(self) -> None:
        require(0.0 <= self.thumbnail_share <= 1.0, "HiredConfig.thumbnail_share in [0, 1]")
        require(0.0 < self.guide_fraction <= 1.0, "HiredConfig.guide_fraction in (0, 1]")


class Hired(RankedMethod):
    """Budget `int(crops * 576 * R)`; tiles share theirs by how many of the thumbnail's
    top guide-layer tokens fall in their region."""

    name = "hired"
    Config = HiredConfig
    config: HiredConfig

    def attention_layers(self) -> tuple[int, ...]:
        return (self.config.guide_layer, self.config.select_layer)

    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        guide = crops.attention[self.config.guide_layer][0].cpu()
        top = round_half_up(self.config.guide_fraction * guide.numel())
        chosen = torch.sort(guide, descending=True, stable=True).indices[:top]
        region = grid.thumbnail_tile_map()[chosen]
        hits = torch.bincount(region, minlength=grid.num_crops)[1:].double()
        order = rank_crops(crops.attention[self.config.select_layer], grid)
        return Ranking(order, {"tile_weights": hits})

    def state_shapes(self, grid: TileGrid,
                     embed_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"tile_weights": ((grid.num_crops - 1,), torch.float64)}

    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        caps = ranking.caps
        budget = int(grid.num_crops * grid.tokens_per_crop * ratio)
        thumb = min(caps[0], int(self.config.thumbnail_share * budget))
        tiles = allocate(budget - thumb, ranking.state["tile_weights"].tolist(), caps[1:])
        return [min(caps[0], budget - sum(tiles)), *tiles]


@dataclasses.dataclass(frozen=True)
class GlobalCom2Config:
    """GlobalCom2 (thumbnail as global commander) settings."""

    layer: int = 22
    """Layer whose CLS attention guides the split and ranks tokens in each crop."""
    sharpness: float = 10.0
    """p = softmax(sharpness * s) over the tiles' shares s of thumbnail attention. The
    published "temperature 10" is read as this multiplier: dividing shares that are
    at most 1 by 10 would make every tile's ratio equal."""

    def __post_init__(self) -> None:
        require(self.sharpness > 0, "GlobalCom2Config.sharpness must be > 0")


class GlobalCom2(RankedMethod):
    """Thumbnail keeps `R * 576`; tile i keeps `R * (1 + p_i - mean p)` of its tokens."""

    name = "globalcom2"
    Config = GlobalCom2Config
    config: GlobalCom2Config

    def attention_layers(self) -> tuple[int, ...]:
        return (self.config.layer,)

    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        scores = crops.attention[self.config.layer]
        thumb = scores[0].cpu().double()
        region = grid.thumbnail_tile_map()
        share = torch.zeros(grid.num_crops, dtype=torch.float64).index_add_(0, region, thumb)
        share = share[1:] / share[1:].sum().clamp_min(1e-12)
        p = torch.softmax(self.config.sharpness * share, 0)
        return Ranking(rank_crops(scores, grid), {"tile_ratio": 1.0 + p - p.mean()})

    def state_shapes(self, grid: TileGrid,
                     embed_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"tile_ratio": ((grid.num_crops - 1,), torch.float64)}

    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        caps = ranking.caps
        budget = total_budget(ratio, grid.tokens_per_crop, grid.num_crops)
        thumb = min(caps[0], round_half_up(ratio * grid.tokens_per_crop))
        tiles = allocate(budget - thumb, ranking.state["tile_ratio"].tolist(), caps[1:])
        return [min(caps[0], budget - sum(tiles)), *tiles]
