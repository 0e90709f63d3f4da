"""Cache entries of pruned tokens, and the keys they are stored under.

For a prefix-shaped method (`RankedMethod`) one entry per image holds what does not
depend on the prompt: every crop's tokens in rank order (up to the method's per-crop
cap) with their features, plus the small budget state (for HERO the crops' CLIP
embeddings). Any later question is then served exactly: its budgets are computed
from the entry and each crop keeps a prefix of its ranking. Other methods cache the
packed tokens of one full request.

Keys are derived server-side from the image's content hash and the encoder and
method fingerprints; a client never chooses one. Every value also records that
`Origin` itself, and a reader checks it (`entry_from_bytes`, `check_entry`), so a
value written or copied under the wrong key is never used.

A reader also checks that an entry is exactly what the method and the encoder make for
an image of its size (`check_entry` against `EntryShape`): image size, one ranking per
crop of the method's length, indices unique and inside the unpadded window, features
and state of the expected shapes and dtypes, all finite. Whatever fails is refused as
`CorruptPayloadError`, never handed to the code that uses the entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from hero_core.errors import CorruptPayloadError
from hero_core.methods.base import RankedMethod, Ranking
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
    """What a cache value was made from: recorded in the value, checked on read."""

    image: str
    """SHA-256 of the encoded image bytes (`image_digest`)."""
    encoder: str
    """Encoder fingerprint (model, feature layer, tiling, pixel decoding)."""
    method: str
    """Pruning method fingerprint (name and settings)."""

    def as_meta(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def check(self, meta: dict[str, Any]) -> None:
        """`CorruptPayloadError` unless `meta` records this origin."""
        recorded = meta.get("origin")
        if recorded != self.as_meta():
            raise CorruptPayloadError(f"value was made from {recorded!r:.300}, not "
                                      f"{self.as_meta()}")


@dataclasses.dataclass
class RankedEntry:
    """Prompt-independent pruning state of one image for one `RankedMethod`."""

    image_size: tuple[int, int]
    order: list[torch.Tensor]
    """Per crop, token indices `(n_i,)` in rank order."""
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


def select_from_entry(entry: RankedEntry, method: RankedMethod, grid: TileGrid, ratio: float,
                      question: torch.Tensor | None) -> PackedTokens:
    """Packed tokens for one request: budgets from the entry, then a prefix per crop."""
    budgets = method.budgets(Ranking(entry.order, entry.state), grid, ratio, question)
    selection = Selection([o[:n] for o, n in zip(entry.order, budgets, strict=True)],
                          [f[:n] for f, n in zip(entry.features, budgets, strict=True)])
    return pack_tokens(selection, None, grid)


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


def check_entry(entry: RankedEntry, method: RankedMethod, tiling: TilingSpec,
                shape: EntryShape) -> TileGrid:
    """The entry's grid; `CorruptPayloadError` unless the entry is what `method.rank`
    and an encoder of `shape` make for an image of its size (module docstring)."""
    grid = stored_grid(entry.image_size, tiling, shape.max_pixels)
    if entry.image_size != grid.image_size or len(entry.order) != grid.num_crops:
        raise CorruptPayloadError(f"entry has {len(entry.order)} crops of a "
                                  f"{entry.image_size} image; the grid has {grid.num_crops}")
    _check_rankings(entry, grid, method.ranking_lengths(grid), shape)
    _check_state(entry.state, method.state_shapes(grid, shape.embed_dim))
    return grid


def _check_rankings(entry: RankedEntry, grid: TileGrid, lengths: list[int],
                    shape: EntryShape) -> None:
    """Each crop: `lengths[i]` unique indices inside its unpadded window, and one finite
    feature row of `shape` per index."""
    valid = grid.valid_mask()
    for crop, (order, feats) in enumerate(zip(entry.order, entry.features, strict=True)):
        n = order.numel()
        if n != lengths[crop]:
            raise CorruptPayloadError(f"crop {crop} ranks {n} tokens, not {lengths[crop]}")
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


def entry_to_bytes(entry: RankedEntry, method_fp: str, origin: Origin | None = None) -> bytes:
    """Serialise an entry (versioned header, CRC-32; see `hero_core.serialization`),
    recording the `origin` it was made from."""
    tensors: dict[str, torch.Tensor] = {
        "lengths": torch.tensor([o.numel() for o in entry.order], dtype=torch.int32),
        "order": torch.cat(entry.order).to(torch.int16),
        "features": torch.cat(entry.features),
    }
    tensors.update({f"state.{k}": v for k, v in entry.state.items()})
    meta: dict[str, Any] = {"image_size": list(entry.image_size), "method": method_fp}
    if origin is not None:
        meta["origin"] = origin.as_meta()
    return encode_record(ENTRY_KIND, meta, tensors)


def entry_from_bytes(data: bytes, method_fp: str, origin: Origin | None = None) -> RankedEntry:
    """Inverse of `entry_to_bytes`; `CorruptPayloadError` on any mismatch, including an
    entry written for another method fingerprint or (when given) another origin, and
    metadata or arrays of the wrong type."""
    meta, t = decode_record(data, ENTRY_KIND)
    if origin is not None:
        origin.check(meta)
    if meta.get("method") != method_fp:
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
