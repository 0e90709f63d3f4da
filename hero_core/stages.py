"""The two stages every caller runs: an image into a cache entry, an entry into one
request's tokens.

* `ImageStage` (stage 1) decodes and tiles an image, encodes its crops (one tower pass
  for a batch of images) and ranks them (`rank_image`) into an `Entry`: what the cache
  stores, with its grid and `Origin`. It depends on the image and the method alone
  (a method that is not prefix-shaped also on the retention, which its origin names).
* `select_tokens` (stage 2) turns an entry, a method, a retention and the question's
  embedding into packed tokens: budgets, selection, packing, and the refusal of a
  retention that keeps no token of the image.

`hero_core.pipeline.Pruner` (`hero prune`), the evals and the vision service run these
two; none of them composes their parts itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from hero_core.cache import (
    Entry,
    EntryShape,
    EntrySpec,
    Origin,
    build_entry,
    entry_selection,
    image_digest,
    selected_entry,
)
from hero_core.config import DEFAULT_LIMITS, Limits
from hero_core.encoder import EncodedCrops, VisionEncoder
from hero_core.errors import ConfigError, InvalidRatioError, PromptTooLongError
from hero_core.image import decode_image
from hero_core.methods import PruningMethod, RankedMethod
from hero_core.packing import PackedTokens, Selection, pack_tokens
from hero_core.tiling import TileGrid, TilingSpec, tile_image


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


def entry_origin(method: PruningMethod, ratio: float, image: str = "",
                 encoder: str = "") -> Origin:
    """The origin of `method`'s entry of an image: a ranking serves every retention; any
    other method's entry is made for `ratio`."""
    retention = None if isinstance(method, RankedMethod) else check_ratio(ratio)
    return Origin(image, encoder, method.compute_hash(), retention)


@dataclasses.dataclass
class Tiled:
    """One decoded image, cut into crops for the tower."""

    pixels: torch.Tensor
    """`(K+1, 3, crop, crop)` float32 normalised crops (`hero_core.tiling.tile_image`)."""
    grid: TileGrid
    digest: str
    """`image_digest` of the encoded bytes; "" for an image given as a picture."""


@dataclasses.dataclass
class Selected:
    """What one request keeps of an entry, as a selection and packed in LLM order."""

    selection: Selection
    packed: PackedTokens


class ImageStage:
    """Stage 1: an image in, its cache `Entry` for a method out."""

    def __init__(self, vision: VisionEncoder, tiling: TilingSpec, *, encoder_fp: str = "",
                 limits: Limits = DEFAULT_LIMITS, dtype: torch.dtype = torch.float32):
        """`encoder_fp`: the encoder's fingerprint, recorded in every origin (cache keys);
        `dtype`: what entries store their features in."""
        self.vision, self.tiling, self.limits = vision, tiling, limits
        self.encoder_fp, self.dtype = encoder_fp, dtype

    @property
    def spec(self) -> EntrySpec:
        """What this stage's entries are made with, for readers that hold no model."""
        shape = EntryShape(self.vision.feature_dim, self.dtype, self.vision.embed_dim,
                           self.limits.max_image_pixels)
        return EntrySpec(self.encoder_fp, self.tiling, shape)

    def check_method(self, method: PruningMethod) -> None:
        """Refuse methods that read layers this tower does not have."""
        for layer in (*method.attention_layers(), *method.key_layers()):
            if not 0 <= layer < self.vision.num_layers:
                raise ConfigError(f"{method.name} reads layer {layer} but the vision tower has "
                                  f"{self.vision.num_layers} layers")

    def tile(self, image: bytes | Image.Image) -> Tiled:
        """Decode (encoded bytes, within `limits`) and tile one image; CPU only."""
        if isinstance(image, Image.Image):
            pixels, grid = tile_image(image, self.tiling)
            return Tiled(pixels, grid, "")
        pixels, grid = tile_image(decode_image(image, self.limits), self.tiling)
        return Tiled(pixels, grid, image_digest(image))

    def encode(self, jobs: Sequence[tuple[Tiled, PruningMethod, float]]
               ) -> list[Entry | Exception]:
        """Entries of several images (image, method, retention) from one tower pass over
        all of their crops; each image is then ranked alone, so a failure (a method this
        tower cannot run, a retention that keeps nothing) is that image's alone."""
        checked: list[Exception | None] = []
        for _, method, _ in jobs:
            try:
                self.check_method(method)
                checked.append(None)
            except Exception as exc:  # reported for this image only
                checked.append(exc)
        good = [m for (_, m, _), problem in zip(jobs, checked, strict=True) if problem is None]
        layers = sorted({layer for m in good for layer in m.attention_layers()})
        keys = sorted({layer for m in good for layer in m.key_layers()})
        encoded = self.vision.encode(torch.cat([t.pixels for t, _, _ in jobs]), layers, keys)
        entries: list[Entry | Exception] = []
        offset = 0
        for (tiled, method, ratio), problem in zip(jobs, checked, strict=True):
            crops = encoded.select(slice(offset, offset + tiled.pixels.shape[0]))
            offset += tiled.pixels.shape[0]
            try:
                if problem is not None:
                    raise problem
                origin = entry_origin(method, ratio, tiled.digest, self.encoder_fp)
                entries.append(rank_image(crops, tiled.grid, method, origin, self.dtype))
            except Exception as exc:
                entries.append(exc)
        return entries

    def entry(self, tiled: Tiled, method: PruningMethod, ratio: float) -> Entry:
        """The entry of one image (`encode` of one job); its failure is raised."""
        (made,) = self.encode([(tiled, method, ratio)])
        if isinstance(made, Exception):
            raise made
        return made


def rank_image(crops: EncodedCrops, grid: TileGrid, method: PruningMethod, origin: Origin,
               dtype: torch.dtype = torch.float32) -> Entry:
    """Stage 1 after the tower pass: a `RankedMethod`'s ranking of one image's crops, or
    what another method keeps at `origin.retention`, as an entry storing `dtype`."""
    if isinstance(method, RankedMethod):
        return Entry(origin, grid, build_entry(method.rank(crops, grid), crops.features, grid,
                                               dtype))
    if origin.retention is None:
        raise ValueError(f"{method.name} is not prefix-shaped: its origin needs a retention")
    retention = origin.retention
    selection = method.select(crops, grid, retention, None)
    if selection.total == 0:
        raise no_token_error(method, grid, retention,
                             lambda r: method.select(crops, grid, r, None).total > 0)
    return Entry(origin, grid, selected_entry(selection, crops.features, grid, dtype))


def select_tokens(entry: Entry, method: PruningMethod, ratio: float,
                  question: torch.Tensor | None) -> Selected:
    """Stage 2: the tokens one request keeps of `entry` (made by `method`), at `ratio`
    for `question` (its `(P,)` embedding, or None), packed in LLaVA-NeXT order;
    `InvalidRatioError`, naming the smallest retention that keeps one, when they are
    none."""
    ratio = check_ratio(ratio)
    if entry.origin.method != method.compute_hash() \
            or entry.origin.retention not in (None, ratio):
        raise ValueError(f"the entry was made by {entry.origin.method} at retention "
                         f"{entry.origin.retention}, not by {method.name} at {ratio:g}")
    selection = entry_selection(entry.tokens, method, entry.grid, ratio, question)
    if selection.total == 0:
        raise no_token_error(method, entry.grid, ratio, lambda r: entry_selection(
            entry.tokens, method, entry.grid, r, question).total > 0)
    return Selected(selection, pack_tokens(selection, None, entry.grid))


def prune_crops(crops: EncodedCrops, grid: TileGrid, method: PruningMethod, ratio: float,
                question: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> Selected:
    """Both stages for one image whose crops are already encoded (a table of encoded
    crops, a benchmark's synthetic ones): its entry, then this request's tokens."""
    entry = rank_image(crops, grid, method, entry_origin(method, ratio), dtype)
    return select_tokens(entry, method, ratio, question)


def no_token_error(method: PruningMethod, grid: TileGrid, ratio: float,
                   keeps: Callable[[float], bool]) -> InvalidRatioError:
    """The refusal of a retention that keeps no token of an image; `keeps(r)`: whether
    retention `r` keeps one."""
    low = smallest_ratio(keeps, ratio)
    return InvalidRatioError(f"retention {ratio:g} keeps no token of this image "
                             f"({grid.rows}x{grid.cols} grid, method {method.name}); "
                             f"the smallest retention that keeps one is {low:g}")


def smallest_ratio(keeps: Callable[[float], bool], keeps_none: float) -> float:
    """The smallest retention, rounded up to 3 significant digits, at which `keeps`
    holds, above `keeps_none` (where it does not); more retention never keeps fewer."""
    low, high = keeps_none, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if keeps(mid) else (mid, high)
    scale = math.pow(10, 2 - math.floor(math.log10(high)))
    return min(1.0, math.ceil(high * scale) / scale)
