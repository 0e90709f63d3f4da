"""Cache entries of pruned tokens, and the keys they are stored under.

For a prefix-shaped method (`RankedMethod`) one entry per image holds what does not
depend on the prompt: every crop's tokens in rank order (up to the method's per-crop
cap) with their features, plus the small budget state (for HERO the crops' CLIP
embeddings). Any later question is then served exactly: its budgets are computed
from the entry and each crop keeps a prefix of its ranking. Other methods cache the
packed tokens of one full request.

Keys are derived server-side from the image's content hash and the encoder and
method fingerprints; a client never chooses one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

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


def entry_to_bytes(entry: RankedEntry, method_fp: str) -> bytes:
    """Serialise an entry (versioned header, CRC-32; see `hero_core.serialization`)."""
    tensors: dict[str, torch.Tensor] = {
        "lengths": torch.tensor([o.numel() for o in entry.order], dtype=torch.int32),
        "order": torch.cat(entry.order).to(torch.int16),
        "features": torch.cat(entry.features),
    }
    tensors.update({f"state.{k}": v for k, v in entry.state.items()})
    meta: dict[str, Any] = {"image_size": list(entry.image_size), "method": method_fp}
    return encode_record(ENTRY_KIND, meta, tensors)


def entry_from_bytes(data: bytes, method_fp: str) -> RankedEntry:
    """Inverse of `entry_to_bytes`; `CorruptPayloadError` on any mismatch, including an
    entry written for another method fingerprint."""
    from hero_core.errors import CorruptPayloadError

    meta, t = decode_record(data, ENTRY_KIND)
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
