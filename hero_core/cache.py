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
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from hero_core.errors import CorruptPayloadError
from hero_core.methods.base import RankedMethod, Ranking
from hero_core.packing import PackedTokens, Selection, pack_tokens
from hero_core.serialization import DTYPES, decode_record, encode_record
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
            raise CorruptPayloadError(f"value was made from {recorded}, not {self.as_meta()}")


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


def check_entry(entry: RankedEntry, grid: TileGrid, feature_dim: int) -> None:
    """`CorruptPayloadError` unless every prefix of the entry packs into a valid layout
    for `grid`: one ranking per crop, indices unique and inside the crop's unpadded
    window, one `feature_dim` feature row per index."""
    if entry.image_size != grid.image_size or len(entry.order) != grid.num_crops:
        raise CorruptPayloadError(f"entry has {len(entry.order)} crops of a "
                                  f"{entry.image_size} image; the grid has {grid.num_crops}")
    valid = grid.valid_mask()
    for crop, (order, feats) in enumerate(zip(entry.order, entry.features, strict=True)):
        n = order.numel()
        if n and (int(order.min()) < 0 or int(order.max()) >= valid.shape[1]
                  or not bool(valid[crop, order].all()) or order.unique().numel() != n):
            raise CorruptPayloadError(f"crop {crop}'s ranking has indices outside its window "
                                      "or repeated")
        if tuple(feats.shape) != (n, feature_dim):
            raise CorruptPayloadError(f"crop {crop} has features {tuple(feats.shape)}, not "
                                      f"({n}, {feature_dim})")


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
    entry written for another method fingerprint or (when given) another origin."""
    meta, t = decode_record(data, ENTRY_KIND)
    if origin is not None:
        origin.check(meta)
    try:
        if meta["method"] != method_fp:
            raise CorruptPayloadError(f"entry is for method {meta['method']}, not {method_fp}")
        lengths = [int(n) for n in t["lengths"].tolist()]
        if sum(lengths) != t["order"].shape[0] or t["features"].shape[0] != t["order"].shape[0] \
                or t["features"].dtype not in DTYPES.values():
            raise CorruptPayloadError("entry arrays do not agree in length")
        order = list(torch.split(t["order"].long(), lengths))
        features = list(torch.split(t["features"], lengths))
        state = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
        size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CorruptPayloadError(f"entry is malformed: {exc}") from exc
    return RankedEntry(size, order, features, state)
