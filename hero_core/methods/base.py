"""The interface every pruning method implements.

A method looks at one image's `EncodedCrops` and `TileGrid` (plus, if it wants, the
question's CLIP embedding) and returns a `Selection`. Methods whose kept sets are
prefixes of image-only per-crop rankings derive from `RankedMethod`: their work
splits into `rank` (image only, cacheable) and `budgets` (cheap, may read the
question), which is what lets a cache entry serve any later question exactly.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch

from hero_core.config import compute_config_hash
from hero_core.encoder import EncodedCrops
from hero_core.packing import Selection
from hero_core.tiling import TileGrid


@dataclasses.dataclass
class Ranking:
    """Image-only result of `RankedMethod.rank`.

    `order[i]`: crop i's valid token indices `(n_i,)` long, best first, truncated at
    the method's per-crop cap. `state`: small per-image tensors that `budgets` needs
    (e.g. the crops' CLIP embeddings), never features.
    """

    order: list[torch.Tensor]
    state: dict[str, torch.Tensor]

    @property
    def caps(self) -> list[int]:
        return [int(o.numel()) for o in self.order]


class PruningMethod(abc.ABC):
    """A visual-token selection rule with a frozen dataclass config."""

    name: ClassVar[str]
    prefix_shaped: ClassVar[bool] = False
    """True when kept sets are prefixes of image-only rankings (cache per image)."""
    Config: ClassVar[type[Any]]

    def __init__(self, config: Any = None):
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}")

    def attention_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose CLS-row attention the method reads."""
        return ()

    def key_layers(self) -> tuple[int, ...]:
        """Layers whose patch keys the method reads."""
        return ()

    @property
    def uses_question(self) -> bool:
        """Whether the kept set can depend on the question."""
        return False

    @abc.abstractmethod
    def select(self, crops: EncodedCrops, grid: TileGrid, ratio: float,
               question: torch.Tensor | None) -> Selection:
        """Choose tokens for one image; `question` is a `(P,)` CLIP text embedding or None."""

    def compute_hash(self) -> str:
        """Fingerprint of the method and its output-affecting settings."""
        return f"{self.name}-{compute_config_hash(self.config)}"


class RankedMethod(PruningMethod):
    """A method whose kept sets are prefixes of image-only per-crop rankings."""

    prefix_shaped = True

    @abc.abstractmethod
    def rank(self, crops: EncodedCrops, grid: TileGrid) -> Ranking:
        """Per-crop token rankings and budget state; depends on the image alone."""

    @abc.abstractmethod
    def budgets(self, ranking: Ranking, grid: TileGrid, ratio: float,
                question: torch.Tensor | None) -> list[int]:
        """Tokens to keep per crop, each at most `ranking.caps[i]`."""

    def ranking_lengths(self, grid: TileGrid) -> list[int]:
        """How long each crop's ranking from `rank` is for `grid` (a cache reader checks
        stored entries against it): every unpadded token, unless the method caps it."""
        return valid_counts(grid)

    def state_shapes(self, grid: TileGrid,
                     embed_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each `Ranking.state` tensor `rank` returns for `grid` when
        crop embeddings are `embed_dim` wide (a cache reader checks stored entries
        against it)."""
        return {}

    def select(self, crops: EncodedCrops, grid: TileGrid, ratio: float,
               question: torch.Tensor | None) -> Selection:
        ranking = self.rank(crops, grid)
        return select_prefixes(ranking, self.budgets(ranking, grid, ratio, question))


def select_prefixes(ranking: Ranking, budgets: list[int]) -> Selection:
    """Keep the first `budgets[i]` tokens of each crop's ranking."""
    return Selection([order[:n] for order, n in zip(ranking.order, budgets, strict=True)])


def rank_valid(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indices of the valid tokens by descending score; lower index wins ties.

    scores, valid: `(T,)`. Returns `(valid.sum(),)` long.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[valid[order]]


def valid_counts(grid: TileGrid) -> list[int]:
    """Unpadded tokens per crop, thumbnail first."""
    return grid.valid_mask().sum(1).tolist()
