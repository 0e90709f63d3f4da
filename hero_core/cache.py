"""Cache entries of pruned tokens, and the keys they are stored under.

An `Entry` is what `hero_core.stages.ImageStage` makes of one image for one method and
what `hero_core.stages.select_tokens` serves requests from. For a prefix-shaped method
(`RankedMethod`) it holds what does not depend on the prompt: every crop's tokens in
rank order (up to the method's per-crop cap) with their features, plus the small
budget state (for HERO the crops' CLIP embeddings). Any later question is then served
exactly: its budgets are computed from the entry and each crop keeps a prefix of its
ranking. For any other method it holds the tokens the method keeps at one retention
(its `Origin` names that retention), served whole.

Keys are derived server-side from the entry's `Origin` (the image's content hash and the
encoder and method fingerprints); a client never chooses one. Binding a stored value to
its key is the store's envelope's job (the vision service's token cache), not the
record's.

A reader checks that a stored entry is exactly what the method and the encoder make for
an image of its size (`check_entry` against `EntryShape`): image size, one ranking per
crop of the method's length (for other methods, at most the crop's tokens), indices
unique and inside the unpadded window, features and state of the expected shapes and
dtypes, all finite. Whatever fails is refused as `CorruptPayloadError`, never handed to
the code that uses the entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from hero_core.errors import CorruptPayloadError
from hero_core.methods.base import PruningMethod, RankedMethod, Ranking, valid_counts
from hero_core.packing import PackedTokens, Selection, pack_tokens
from hero_core.serialization import decode_record, encode_record
from hero_core.tiling import TileGrid, TilingSpec, plan_grid

KEY_PREFIX = "hero:v1"
ENTRY_KIND = "ranked_entry"


def image_digest(data: bytes) -> str:
    """Content id of encoded image bytes (SHA-256, hex)."""
    return hashlib.sha256(data).hexdigest()


def tokens_key(digest: str, encoder_fp: str, method_fp: str, request_fp: str = "") -> str:
    """Key of an image's cached tokens; `request_fp` only for non-prefix methods."""
    key = f"{KEY_PREFIX}:tok:{encoder_fp}:{method_fp}:{digest}"
    return f"{key}:{request_fp}" if request_fp else key


def image_key(digest: str) -> str:
    """Key of an image's encoded bytes (so clients may send only its id)."""
    return f"{KEY_PREFIX}:img:{digest}"


def request_fingerprint(ratio: float, question: str | None) -> str:
    """Fingerprint of the request-specific inputs of a non-prefix method."""
    blob = f"{ratio!r}|{question if question is not None else ''}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Origin:
    """What an entry is made from; its cache key is derived from it (`key`)."""

    image: str
    """SHA-256 of the encoded image bytes (`image_digest`); "" when the image came as
    pixels (no cache)."""
    encoder: str
    """Encoder fingerprint (model, feature layer, tiling, pixel decoding)."""
    method: str
    """Pruning method fingerprint (name and settings)."""
    retention: float | None = None
    """The retention the entry was selected at, for a method that is not prefix-shaped;
    None for a ranking, which serves every retention."""

    @property
    def key(self) -> str:
        request = "" if self.retention is None else request_fingerprint(self.retention, None)
        return tokens_key(self.image, self.encoder, self.method, request)


@dataclasses.dataclass
class RankedEntry:
    """The tokens an entry stores: for a `RankedMethod` the prompt-independent ranking
    state of one image, for another method the tokens it keeps at one retention."""

    image_size: tuple[int, int]
    order: list[torch.Tensor]
    """Per crop, token indices `(n_i,)` in rank order (in selection order for a method
    that is not prefix-shaped)."""
    features: list[torch.Tensor]
    """Per crop, features `(n_i, D)` of those tokens, in the same order."""
    state: dict[str, torch.Tensor]

    def grid(self, tiling: TilingSpec) -> TileGrid:
        return plan_grid(self.image_size, tiling)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)


def build_entry(ranking: Ranking, features: torch.Tensor, grid: TileGrid,
                dtype: torch.dtype) -> RankedEntry:
    """The entry for `ranking` over crop features `(K+1, T, D)`, stored as `dtype`."""
    feats = [features[i, order.to(features.device)].to(dtype).cpu()
             for i, order in enumerate(ranking.order)]
    return RankedEntry(grid.image_size, [o.cpu() for o in ranking.order], feats,
                       {k: v.cpu() for k, v in ranking.state.items()})


def selected_entry(selection: Selection, features: torch.Tensor, grid: TileGrid,
                   dtype: torch.dtype) -> RankedEntry:
    """The entry of a method that is not prefix-shaped: the tokens `selection` keeps, with
    their features (the selection's own, e.g. merged ones, else gathered from the crop
    features `(K+1, T, D)`), stored as `dtype`."""
    feats = [(own if own is not None else features[i, index.to(features.device)])
             .to(dtype).cpu()
             for i, (index, own) in enumerate(zip(selection.indices, selection.features,
                                                  strict=True))]
    return RankedEntry(grid.image_size, [i.long().cpu() for i in selection.indices], feats, {})


@dataclasses.dataclass
class Entry:
    """What the cache stores for one image under one method, and where it came from."""

    origin: Origin
    grid: TileGrid
    """The image's tile grid (from its size and the encoder's tiling)."""
    tokens: RankedEntry

    @property
    def ranked(self) -> bool:
        """Whether the entry is a ranking (serves every retention and question)."""
        return self.origin.retention is None


def entry_selection(entry: RankedEntry, method: PruningMethod, grid: TileGrid, ratio: float,
                    question: torch.Tensor | None) -> Selection:
    """What one request keeps of an entry: for a `RankedMethod`, its budgets for `ratio`
    and `question`, then a prefix of each crop's ranking; for another method, everything
    (the entry was selected at the request's retention)."""
    if not isinstance(method, RankedMethod):
        return Selection(list(entry.order), list(entry.features))
    budgets = method.budgets(Ranking(entry.order, entry.state), grid, ratio, question)
    return Selection([o[:n] for o, n in zip(entry.order, budgets, strict=True)],
                     [f[:n] for f, n in zip(entry.features, budgets, strict=True)])


def select_from_entry(entry: RankedEntry, method: RankedMethod, grid: TileGrid, ratio: float,
                      question: torch.Tensor | None) -> PackedTokens:
    """Packed tokens for one request from a ranking (`entry_selection`, then packing);
    `hero_core.stages.select_tokens` adds the refusal of a selection without tokens."""
    return pack_tokens(entry_selection(entry, method, grid, ratio, question), None, grid)


@dataclasses.dataclass(frozen=True)
class EntryShape:
    """What the reader's encoder makes, to check stored entries against."""

    feature_dim: int
    """Width of the vision tower's features."""
    dtype: torch.dtype
    """Dtype the features are cached in."""
    embed_dim: int
    """Width of the crop embeddings (`EncodedCrops.image_embeds`)."""
    max_pixels: int
    """Largest image (height x width) the service decodes."""


def stored_grid(image_size: tuple[int, int], tiling: TilingSpec, max_pixels: int) -> TileGrid:
    """The grid of a stored value's image size; `CorruptPayloadError` unless the size is
    positive and at most `max_pixels` (no image that large is ever encoded)."""
    height, width = image_size
    if not (height > 0 and width > 0 and height * width <= max_pixels):
        raise CorruptPayloadError(f"value is for a {height}x{width} image, outside 1.."
                                  f"{max_pixels} pixels")
    try:
        return plan_grid(image_size, tiling)
    except (ArithmeticError, ValueError) as exc:
        raise CorruptPayloadError(f"value's image size has no grid: {exc}") from exc


def check_entry(entry: RankedEntry, method: PruningMethod, tiling: TilingSpec,
                shape: EntryShape) -> TileGrid:
    """The entry's grid; `CorruptPayloadError` unless the entry is what `method` and an
    encoder of `shape` make for an image of its size (module docstring)."""
    grid = stored_grid(entry.image_size, tiling, shape.max_pixels)
    if entry.image_size != grid.image_size or len(entry.order) != grid.num_crops:
        raise CorruptPayloadError(f"entry has {len(entry.order)} crops of a "
                                  f"{entry.image_size} image; the grid has {grid.num_crops}")
    if isinstance(method, RankedMethod):
        _check_rankings(entry, grid, method.ranking_lengths(grid), shape, exact=True)
        _check_state(entry.state, method.state_shapes(grid, shape.embed_dim))
    else:
        _check_rankings(entry, grid, valid_counts(grid), shape, exact=False)
        _check_state(entry.state, {})
        if not any(order.numel() for order in entry.order):
            raise CorruptPayloadError("entry keeps no token")
    return grid


def _check_rankings(entry: RankedEntry, grid: TileGrid, lengths: list[int],
                    shape: EntryShape, exact: bool) -> None:
    """Each crop: `lengths[i]` (at most that many, unless `exact`) unique indices inside
    its unpadded window, and one finite feature row of `shape` per index."""
    valid = grid.valid_mask()
    for crop, (order, feats) in enumerate(zip(entry.order, entry.features, strict=True)):
        n = order.numel()
        if (n != lengths[crop]) if exact else (n > lengths[crop]):
            raise CorruptPayloadError(f"crop {crop} ranks {n} tokens, not "
                                      f"{'' if exact else 'at most '}{lengths[crop]}")
        if n and (int(order.min()) < 0 or int(order.max()) >= valid.shape[1]
                  or not bool(valid[crop, order].all()) or order.unique().numel() != n):
            raise CorruptPayloadError(f"crop {crop}'s ranking has indices outside its window "
                                      "or repeated")
        if tuple(feats.shape) != (n, shape.feature_dim) or feats.dtype != shape.dtype:
            raise CorruptPayloadError(f"crop {crop} has {feats.dtype} features "
                                      f"{tuple(feats.shape)}, not {shape.dtype} "
                                      f"({n}, {shape.feature_dim})")
        if not bool(torch.isfinite(feats).all()):
            raise CorruptPayloadError(f"crop {crop} has features that are not finite")


def _check_state(state: dict[str, torch.Tensor],
                 expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The method's state tensors, each of its shape and dtype, finite; nothing else."""
    if state.keys() != expected.keys():
        raise CorruptPayloadError(f"entry state holds {sorted(state)}, not {sorted(expected)}")
    for name, (size, dtype) in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != size or tensor.dtype != dtype:
            raise CorruptPayloadError(f"entry state {name} is {tensor.dtype} "
                                      f"{tuple(tensor.shape)}, not {dtype} {size}")
        if not bool(torch.isfinite(tensor).all()):
            raise CorruptPayloadError(f"entry state {name} is not finite")


def entry_to_bytes(entry: RankedEntry, method_fp: str) -> bytes:
    """Serialise an entry (versioned header, CRC-32; see `hero_core.serialization`),
    recording the fingerprint of the method that made it."""
    tensors: dict[str, torch.Tensor] = {
        "lengths": torch.tensor([o.numel() for o in entry.order], dtype=torch.int32),
        "order": torch.cat(entry.order).to(torch.int16),
        "features": torch.cat(entry.features),
    }
    tensors.update({f"state.{k}": v for k, v in entry.state.items()})
    meta: dict[str, Any] = {"image_size": list(entry.image_size), "method": method_fp}
    return encode_record(ENTRY_KIND, meta, tensors)


def entry_from_bytes(data: bytes, method_fp: str | None = None) -> RankedEntry:
    """Inverse of `entry_to_bytes`; `CorruptPayloadError` on any mismatch, including an
    entry written for another method fingerprint (when `method_fp` is given: a reader
    whose store binds values to keys naming the method need not) and metadata or arrays
    of the wrong type."""
    meta, t = decode_record(data, ENTRY_KIND)
    if method_fp is not None and meta.get("method") != method_fp:
        raise CorruptPayloadError(f"entry is for method {meta.get('method')!r:.80}, not "
                                  f"{method_fp}")
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2
            and all(type(v) is int for v in size)):  # an int, not a bool or a float
        raise CorruptPayloadError(f"entry image_size is {size!r:.60}, not [height, width]")
    lengths, order, features = (t.get(name) for name in ("lengths", "order", "features"))
    if lengths is None or order is None or features is None \
            or lengths.dtype != torch.int32 or order.dtype != torch.int16 \
            or not features.dtype.is_floating_point \
            or (lengths.dim(), order.dim(), features.dim()) != (1, 1, 2):
        raise CorruptPayloadError("entry lacks lengths (int32), order (int16) or 2-D float "
                                  "features")
    counts = [int(n) for n in lengths.tolist()]
    if min(counts, default=0) < 0 or sum(counts) != order.shape[0] \
            or features.shape[0] != order.shape[0]:
        raise CorruptPayloadError("entry arrays do not agree in length")
    state = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
    return RankedEntry((size[0], size[1]), list(torch.split(order.long(), counts)),
                       list(torch.split(features, counts)), state)


@dataclasses.dataclass(frozen=True)
class EntrySpec:
    """What an image stage's entries are made with: its encoder's fingerprint (part of
    every key), its tiling and the shape of what it stores. A reader that holds no model
    (the vision service's ingress) checks stored entries against it."""

    encoder: str
    tiling: TilingSpec
    shape: EntryShape


def write_entry(entry: Entry) -> bytes:
    """The bytes the cache stores for `entry` (its origin is the key's business)."""
    return entry_to_bytes(entry.tokens, entry.origin.method)


def read_entry(data: bytes, origin: Origin, method: PruningMethod, spec: EntrySpec) -> Entry:
    """The entry stored for `origin` (by `write_entry`), checked to be what `method` and
    an encoder of `spec` make (`check_entry`); `CorruptPayloadError` otherwise."""
    tokens = entry_from_bytes(data)
    return Entry(origin, check_entry(tokens, method, spec.tiling, spec.shape), tokens)
