"""HERO: tile budgets by saliency and relevance, object tokens from tiles, artifact
tokens from the thumbnail. docs/METHOD.md describes the method and each choice below.

Every default below is a reconstruction of the paper's method and a named field.
"""

from __future__ import annotations

import dataclasses

import torch

from hero_core.budget import allocate, round_half_up, total_budget, zscore
from hero_core.config import require
from hero_core.encoder import EncodedCrops
from hero_core.methods.base import RankedMethod, Ranking, rank_valid, valid_counts
from hero_core.tiling import TileGrid


@dataclasses.dataclass(frozen=True)
class HeroConfig:
    """Settings of HERO; all of them affect the kept tokens."""

    object_layer: int = 11
    """`L_obj`: layer whose CLS attention spreads over foreground objects (tile ranking)."""
    artifact_layer: int = 22
    """`L_art`: layer whose CLS attention collapses onto artifact tokens (thumbnail ranking)."""
    saliency_weight: float = 0.5
    """`lam` in `imp = lam*z(sal) + (1-lam)*z(rel)`; 1.0 ignores the question."""
    budget_temperature: float = 1.0
    """`tau` in `softmax(imp / tau)` that splits the tile budget."""
    thumbnail_share: float | None = None
    """`beta`: thumbnail's share of the budget; None means 1/(K+1)."""
    max_tokens_per_crop: int = 576
    """Cap on any crop's budget, and the length of the rankings a cache entry keeps."""
    artifact_factor: float = 10.0
    """A thumbnail token is an artifact when its L_art attention is at least this many
    times the mean attention per token."""
    max_artifact_tokens: int = 64
    """At most this many artifacts lead the thumbnail ranking."""
    use_relevance: bool = True
    """Score tiles against the question (needs a CLIP text tower)."""
    zscore_eps: float = 1e-6
    """Scores flatter than this standard deviation count as all equal."""

    def __post_init__(self) -> None:
        require(self.object_layer >= 0 and self.artifact_layer >= 0, "layers must be >= 0")
        require(0.0 <= self.saliency_weight <= 1.0, "saliency_weight must be in [0, 1]")
        require(self.budget_temperature > 0, "budget_temperature must be > 0")
        require(self.thumbnail_share is None or 0.0 <= self.thumbnail_share <= 1.0,
                "thumbnail_share must be in [0, 1] or None")
        require(self.max_tokens_per_crop > 0, "max_tokens_per_crop must be > 0")
        require(self.artifact_factor > 0, "artifact_factor must be > 0")
        require(self.max_artifact_tokens >= 0, "max_artifact_tokens must be >= 0")


EQUAL_BUDGETS_TEMPERATURE = 1e9
"""A `budget_temperature` so high that `softmax(imp / tau)` is flat: equal tile budgets."""


def tile_importance(embeds: torch.Tensor, question: torch.Tensor | None,
                    saliency_weight: float, eps: float = 1e-6) -> torch.Tensor:
    """Importance `(K,)` of the tiles from crop embeddings `(K+1, P)` (thumbnail first).

    saliency = tile . thumbnail, relevance = max(tile . question, 0), each z-scored
    across tiles; without a question, importance is the z-scored saliency.
    """
    tiles = embeds[1:].double()
    saliency = zscore(tiles @ embeds[0].double(), eps)
    if question is None:
        return saliency
    relevance = zscore((tiles @ question.double()).clamp_min(0.0), eps)
    return saliency_weight * saliency + (1.0 - saliency_weight) * relevance


def thumbnail_ranking(stage1: torch.Tensor, stage2: torch.Tensor, artifact_factor: float,
                      max_artifacts: int) -> torch.Tensor:
    """Thumbnail tokens `(T,)`: artifacts by stage-2 attention, then the rest by stage 1.

    stage1, stage2: `(T,)` CLS attention at L_obj and L_art.
    """
    everything = torch.ones_like(stage2, dtype=torch.bool)
    by_stage2 = rank_valid(stage2, everything)
    is_artifact = stage2[by_stage2] >= artifact_factor * stage2.mean()
    artifacts = by_stage2[is_artifact][:max_artifacts]
    rest = everything.clone()
    rest[artifacts] = False
    return torch.cat([artifacts, rank_valid(stage1, rest)])


class Hero(RankedMethod):
    """HERO visual-token early dropping."""

    name = "hero"
    Config = HeroConfig
    config: HeroConfig

    def attention_layers(self) -> tuple[int, ...]:
        return (self.config.object_layer, self.config.artifact_layer)

    @property
    def uses_question(self) -> bool:
        return self.config.use_relevance and self.config.saliency_weight < 1.0

    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        cfg = self.config
        stage1 = crops.attention[cfg.object_layer]
        stage2 = crops.attention[cfg.artifact_layer]
        valid = grid.valid_mask().to(stage1.device)
        order = [thumbnail_ranking(stage1[0], stage2[0], cfg.artifact_factor,
                                   cfg.max_artifact_tokens)]
        order += [rank_valid(stage1[i], valid[i]) for i in range(1, grid.num_crops)]
        state = {"embeds": crops.image_embeds.float().cpu()}
        return Ranking([o[: cfg.max_tokens_per_crop].cpu() for o in order], state)

    def ranking_lengths(self, grid: TileGrid) -> list[int]:
        return [min(n, self.config.max_tokens_per_crop) for n in valid_counts(grid)]

    def state_shapes(self, grid: TileGrid,
                     embed_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"embeds": ((grid.num_crops, embed_dim), torch.float32)}

    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        cfg = self.config
        caps = ranking.caps
        budget = total_budget(ratio, grid.tokens_per_crop, grid.num_crops)
        share = cfg.thumbnail_share if cfg.thumbnail_share is not None else 1 / grid.num_crops
        thumb = min(caps[0], round_half_up(share * budget))
        q = question if self.uses_question else None
        imp = tile_importance(ranking.state["embeds"], q, cfg.saliency_weight, cfg.zscore_eps)
        weights = torch.softmax(imp / cfg.budget_temperature, 0).tolist()
        tiles = allocate(budget - thumb, weights, caps[1:])
        # Tiles that cannot take their share hand it back to the thumbnail.
        thumb = min(caps[0], budget - sum(tiles))
        return [thumb, *tiles]
