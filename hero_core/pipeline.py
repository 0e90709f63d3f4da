"""One image and one question in, packed tokens out: tile, encode, select, pack."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from hero_core.config import DEFAULT_LIMITS, Limits
from hero_core.encoder import EncodedCrops, RelevanceEncoder, VisionEncoder
from hero_core.errors import ConfigError, InvalidRatioError, PromptTooLongError
from hero_core.methods import PruningMethod
from hero_core.packing import PackedTokens, Selection, pack_tokens
from hero_core.tiling import TileGrid, TilingSpec, tile_image


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


def check_ratio(ratio: float) -> float:
    """`ratio` if it is a retention in (0, 1], else `InvalidRatioError`."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise InvalidRatioError(f"retention ratio must be in (0, 1], got {ratio!r}; "
                                "e.g. 0.111 keeps about 320 of 2880 tokens")
    return float(ratio)


def check_prompt(text: str, limits: Limits) -> str:
    """`text` if it is within `limits.max_prompt_chars`, else `PromptTooLongError`."""
    if len(text) > limits.max_prompt_chars:
        raise PromptTooLongError(f"prompt is {len(text)} characters, above max_prompt_chars="
                                 f"{limits.max_prompt_chars}; shorten it")
    return text


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
        for layer in (*method.attention_layers(), *method.key_layers()):
            if not 0 <= layer < self.vision.num_layers:
                raise ConfigError(f"{method.name} reads layer {layer} but the vision tower has "
                                  f"{self.vision.num_layers} layers")

    def embed_question(self, question: str, method: PruningMethod) -> torch.Tensor | None:
        """The question's embedding (CLIP text tower or another `RelevanceEncoder`) when the
        method and the model can use it."""
        if not (method.uses_question and self.text is not None and question.strip()):
            return None
        return self.text.embed(question)

    def prune(self, image: Image.Image, question: str, method: PruningMethod,
              ratio: float) -> PruneResult:
        """Prune one image; see `PruneResult`."""
        ratio = check_ratio(ratio)
        check_prompt(question, self.limits)
        self.check_method(method)
        timings: dict[str, float] = {}
        with _timed(timings, "tile"):
            pixels, grid = tile_image(image, self.tiling)
        with _timed(timings, "encode"):
            crops = self.vision.encode(pixels, method.attention_layers(), method.key_layers())
        with _timed(timings, "text"):
            question_embed = self.embed_question(question, method)
        with _timed(timings, "select"):
            selection = method.select(crops, grid, ratio, question_embed)
        if kept(selection) == 0:
            low = smallest_ratio(method, crops, grid, question_embed, ratio)
            raise InvalidRatioError(f"retention {ratio:g} keeps no token of this image "
                                    f"({grid.rows}x{grid.cols} grid, method {method.name}); "
                                    f"the smallest retention that keeps one is {low:g}")
        with _timed(timings, "pack"):
            packed = pack_tokens(selection, crops.features, grid)
        note = self.relevance_note(method)
        return PruneResult(packed, selection, grid, method.name, ratio, timings,
                           notes=(note,) if note else ())


def kept(selection: Selection) -> int:
    """Tokens a selection keeps over all crops."""
    return sum(int(indices.numel()) for indices in selection.indices)


def smallest_ratio(method: PruningMethod, crops: EncodedCrops, grid: TileGrid,
                   question: torch.Tensor | None, keeps_none: float) -> float:
    """The smallest retention, rounded up to 3 significant digits, at which `method`
    keeps at least one token of this image (selection only: the crops are encoded)."""
    low, high = keeps_none, 1.0
    for _ in range(40):  # more retention never keeps fewer tokens
        mid = (low + high) / 2
        low, high = (low, mid) if kept(method.select(crops, grid, mid, question)) else (mid, high)
    scale = math.pow(10, 2 - math.floor(math.log10(high)))
    return min(1.0, math.ceil(high * scale) / scale)
