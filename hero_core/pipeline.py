"""One image and one question in, packed tokens out: `Pruner` runs the two stages of
`hero_core.stages` (the image's entry, then this question's selection), with timings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from hero_core.config import DEFAULT_LIMITS, Limits
from hero_core.encoder import RelevanceEncoder, VisionEncoder
from hero_core.errors import ConfigError
from hero_core.methods import PruningMethod
from hero_core.packing import PackedTokens, Selection
from hero_core.stages import ImageStage, check_prompt, check_ratio, select_tokens
from hero_core.tiling import TileGrid, TilingSpec

__all__ = ["PruneResult", "Pruner", "check_prompt", "check_ratio"]


@dataclasses.dataclass
class PruneResult:
    """Packed tokens plus what produced them."""

    packed: PackedTokens
    selection: Selection
    grid: TileGrid
    method: str
    ratio: float
    timings_ms: dict[str, float]
    notes: tuple[str, ...] = ()
    """Facts about how the result was made that a reader must not miss, e.g. that the
    question could not steer the tile budgets (see `Pruner.relevance_note`)."""


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = (time.perf_counter() - start) * 1e3


class Pruner:
    """Runs a pruning method end to end on one image."""

    def __init__(self, vision: VisionEncoder, tiling: TilingSpec,
                 text: RelevanceEncoder | None = None, limits: Limits = DEFAULT_LIMITS):
        if text is not None and text.tower_kind != vision.kind:
            raise ConfigError(f"the question encoder scores {text.tower_kind} image embeddings, "
                              f"not a {vision.kind} vision tower's; pass one aligned with "
                              f"{vision.kind}, or text=None (tile budgets then use saliency "
                              "only)")
        self.vision, self.tiling, self.text, self.limits = vision, tiling, text, limits
        self.stage = ImageStage(vision, tiling, limits=limits)

    def relevance_note(self, method: PruningMethod) -> str | None:
        """Why a question-using method cannot use the question here, or None if it can."""
        if not method.uses_question or self.text is not None:
            return None
        paired = "has no paired text encoder" if not self.vision.adapter.has_text_tower \
            else "runs without its text encoder loaded"
        return (f"relevance off: the {self.vision.kind} vision tower {paired}; "
                "tile budgets use saliency only")

    def check_method(self, method: PruningMethod) -> None:
        """Refuse methods that read layers this tower does not have."""
        self.stage.check_method(method)

    def embed_question(self, question: str, method: PruningMethod) -> torch.Tensor | None:
        """The question's embedding (CLIP text tower or another `RelevanceEncoder`) when the
        method and the model can use it."""
        if not (method.uses_question and self.text is not None and question.strip()):
            return None
        return self.text.embed(question)

    def prune(self, image: Image.Image | bytes, question: str, method: PruningMethod,
              ratio: float) -> PruneResult:
        """Prune one image (a picture, or encoded bytes to decode); see `PruneResult`."""
        ratio = check_ratio(ratio)
        check_prompt(question, self.limits)
        self.check_method(method)
        timings: dict[str, float] = {}
        with _timed(timings, "tile"):
            tiled = self.stage.tile(image)
        with _timed(timings, "encode"):
            entry = self.stage.entry(tiled, method, ratio)
        with _timed(timings, "text"):
            question_embed = self.embed_question(question, method)
        with _timed(timings, "select"):
            selected = select_tokens(entry, method, ratio, question_embed)
        note = self.relevance_note(method)
        return PruneResult(selected.packed, selected.selection, entry.grid, method.name, ratio,
                           timings, notes=(note,) if note else ())
