"""VisionZip: per crop, dominant tokens by CLS attention plus a few contextual tokens
made by merging the rest into evenly spaced targets by key similarity."""

from __future__ import annotations

import dataclasses

import torch

from hero_core.budget import allocate, round_half_up, total_budget
from hero_core.config import require
from hero_core.encoder import EncodedCrops
from hero_core.methods.base import PruningMethod, rank_valid
from hero_core.packing import Selection
from hero_core.tiling import TileGrid


@dataclasses.dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip settings (54 dominant + 10 contextual of 64 in the original)."""

    layer: int = 22
    """Layer whose CLS attention picks dominant tokens and whose keys measure similarity."""
    contextual_fraction: float = 10 / 64
    """Share of each crop's budget spent on merged contextual tokens."""

    def __post_init__(self) -> None:
        require(0.0 <= self.contextual_fraction < 1.0, "contextual_fraction must be in [0, 1)")


def merge_contextual(rest: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
                     count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens `rest` `(M,)` into `count` evenly spaced targets by key cosine
    similarity; returns the targets' indices `(count,)` and merged features `(count, D)`."""
    step = max(rest.numel() // count, 1)
    targets = rest[::step][:count]
    others = rest[~torch.isin(rest, targets)]
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    nearest = (k[others] @ k[targets].T).argmax(1) if others.numel() else others
    sums = features[targets].float().clone()
    sums.index_add_(0, nearest, features[others].float())
    sizes = torch.ones(targets.numel()).index_add_(0, nearest, torch.ones(others.numel()))
    return targets, (sums / sizes[:, None]).to(features.dtype)


class VisionZip(PruningMethod):
    """Dominant + contextual tokens in every crop; not prefix-shaped (merged features)."""

    name = "visionzip"
    Config = VisionZipConfig
    config: VisionZipConfig

    def attention_layers(self) -> tuple[int, ...]:
        return (self.config.layer,)

    def key_layers(self) -> tuple[int, ...]:
        return (self.config.layer,)

    def select(self, crops: EncodedCrops, grid: TileGrid, ratio: float,
               question: torch.Tensor | None) -> Selection:
        valid = grid.valid_mask()
        caps = valid.sum(1).tolist()
        per_crop = [min(round_half_up(ratio * grid.tokens_per_crop), c) for c in caps]
        budget = total_budget(ratio, grid.tokens_per_crop, grid.num_crops)
        budgets = allocate(min(budget, sum(per_crop)), [1.0] * len(caps), per_crop)
        scores = crops.attention[self.config.layer].cpu()
        keys = crops.keys[self.config.layer].cpu()
        indices: list[torch.Tensor] = []
        features: list[torch.Tensor | None] = []
        for i, n in enumerate(budgets):
            order = rank_valid(scores[i], valid[i])
            contextual = min(round_half_up(n * self.config.contextual_fraction), n)
            dominant, rest = order[: n - contextual], order[n - contextual:]
            if contextual == 0 or rest.numel() == 0:
                indices.append(order[:n])
                features.append(None)
                continue
            targets, merged = merge_contextual(rest, keys[i], crops.features[i].cpu(), contextual)
            indices.append(torch.cat([dominant, targets]))
            features.append(torch.cat([crops.features[i].cpu()[dominant], merged]))
        return Selection(indices, features)
