"""Versioned, checksummed bytes for token structures (wire payloads and cache values).

A record is a safetensors file (8-byte header length, JSON header, raw little-endian
tensor data), so any safetensors reader can open one. Its metadata holds the record
format, its kind, its JSON metadata (for cache values: what they were made from) and
`hero.crc32`: a CRC-32 of the header's other content and one of the tensor data, so a
flipped bit anywhere is caught. A round trip is bit-exact for every dtype (bf16
included). Anything that does not parse raises `CorruptPayloadError`.

Records come back from a shared cache, so the JSON in them is parsed defensively: a
header longer than `MAX_HEADER_BYTES` or any JSON nested deeper than `MAX_JSON_DEPTH`
is refused before it is parsed, and the header must have the safetensors shape
(string metadata, one mapping per tensor).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hero_core.dtypes import DTYPES
from hero_core.errors import CorruptPayloadError
from hero_core.packing import PackedTokens

FORMAT = "hero-record-3"
CRC_KEY = "hero.crc32"
MAX_HEADER_BYTES = 64 << 10
"""Longest JSON header a record may have; the records written here use a few hundred
bytes (a handful of tensors and a short metadata string)."""
MAX_JSON_DEPTH = 8
"""Deepest nesting of the header or the metadata; the records written here use 3."""
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
__all__ = ["DTYPES", "FORMAT", "decode_record", "encode_record", "packed_from_bytes",
           "packed_to_bytes"]


def encode_record(kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named tensors and JSON-able metadata as one self-describing record."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    fields = {"hero.format": FORMAT, "hero.kind": kind,
              "hero.meta": json.dumps(meta, separators=(",", ":"), sort_keys=True)}
    draft = save_safetensors(tensors, metadata=fields)  # the same data, a header to sum
    header, data_start = _header(draft)
    fields[CRC_KEY] = f"{_header_crc(header)}:{zlib.crc32(memoryview(draft)[data_start:])}"
    return bytes(save_safetensors(tensors, metadata=fields))


def decode_record(data: bytes, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a record of `kind`; returns (metadata, tensors). Tensors own their memory."""
    header, data_start = _header(data)
    fields = header.get("__metadata__") or {}
    if fields.get("hero.format") != FORMAT:
        raise CorruptPayloadError(f"record is not in format {FORMAT}")
    if fields.get("hero.kind") != kind:
        raise CorruptPayloadError(f"record holds {fields.get('hero.kind')!r}, expected {kind!r}")
    expected = f"{_header_crc(header)}:{zlib.crc32(memoryview(data)[data_start:])}"
    if fields.get(CRC_KEY) != expected:
        raise CorruptPayloadError("record is truncated or fails its checksum")
    meta = parse_json(fields.get("hero.meta", "").encode(), "record metadata")
    if not isinstance(meta, dict):
        raise CorruptPayloadError("record metadata is not a mapping")
    try:
        tensors = load_safetensors(bytes(data))
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CorruptPayloadError(f"record does not parse: {exc}") from exc
    return meta, tensors


def parse_json(raw: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from untrusted bytes, refused (`CorruptPayloadError`) when nested deeper than
    `max_depth` (checked before parsing, so deep nesting never reaches the recursive
    parser) or when it does not parse."""
    if json_depth(raw) > max_depth:
        raise CorruptPayloadError(f"{what} is nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptPayloadError(f"{what} is malformed: {exc}") from exc


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of JSON text nest (brackets inside strings do
    not count); well-formedness is left to the parser."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if not bare.size:
        return 0
    opens = (bare == ord("[")) | (bare == ord("{"))
    closes = (bare == ord("]")) | (bare == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and where the tensor data starts; its shape is
    checked: string metadata and one mapping per tensor."""
    if len(data) < 8:
        raise CorruptPayloadError(f"record is {len(data)} bytes, shorter than its prefix")
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= len(data) - 8:
        raise CorruptPayloadError("record header length does not fit the record")
    if length > MAX_HEADER_BYTES:
        raise CorruptPayloadError(f"record header is {length} bytes, above "
                                  f"{MAX_HEADER_BYTES}")
    header = parse_json(bytes(data[8:8 + length]), "record header")
    if not isinstance(header, dict):
        raise CorruptPayloadError("record header is not a mapping")
    fields = header.get("__metadata__") or {}
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise CorruptPayloadError("record metadata must map names to strings")
    if not all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__"):
        raise CorruptPayloadError("record header must describe each tensor in a mapping")
    return header, 8 + length


def _header_crc(header: dict[str, Any]) -> int:
    """CRC-32 of the header without its checksum field, in a canonical form."""
    fields = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CRC_KEY}
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    return zlib.crc32(json.dumps({"meta": fields, "tensors": rest}, sort_keys=True).encode())


def packed_to_bytes(packed: PackedTokens, origin: dict[str, str] | None = None) -> bytes:
    """Serialise packed tokens (features in their own dtype), with the `origin` (what
    they were made from; see `hero_core.cache.Origin`) when given."""
    meta: dict[str, Any] = {"image_size": list(packed.image_size), "grid": list(packed.grid),
                            "side": packed.side, "full_tokens": packed.full_tokens}
    if origin is not None:
        meta["origin"] = origin
    tensors = {"features": packed.features, "crop": packed.crop, "row": packed.row,
               "col": packed.col, "newline_after": packed.newline_after}
    return encode_record("packed_tokens", meta, tensors)


def packed_from_bytes(data: bytes,
                      check_meta: Callable[[dict[str, Any]], None] | None = None
                      ) -> PackedTokens:
    """Inverse of `packed_to_bytes`; raises `CorruptPayloadError` on any mismatch, or
    what `check_meta` raises for the record's metadata."""
    meta, t = decode_record(data, "packed_tokens")
    if check_meta is not None:
        check_meta(meta)
    size, grid = _ints(meta, "image_size", 2), _ints(meta, "grid", 2)
    (side,), (full_tokens,) = _ints(meta, "side", 1), _ints(meta, "full_tokens", 1)
    try:
        packed = PackedTokens(
            features=t["features"], crop=t["crop"], row=t["row"], col=t["col"],
            newline_after=t["newline_after"], image_size=(size[0], size[1]),
            grid=(grid[0], grid[1]), side=side, full_tokens=full_tokens)
    except KeyError as exc:
        raise CorruptPayloadError(f"packed-token record lacks a field: {exc}") from exc
    check_layout(packed)
    return packed


def _ints(meta: dict[str, Any], name: str, count: int) -> list[int]:
    """`count` integers of metadata field `name` (a list when `count` > 1; booleans and
    floats are not integers here); `CorruptPayloadError` otherwise."""
    value = meta.get(name)
    values: list[Any] = value if isinstance(value, list) and count > 1 else [value]
    if len(values) != count or not all(type(v) is int for v in values):
        raise CorruptPayloadError(f"record metadata {name} is {value!r:.60}, not "
                                  f"{count} integer(s)")
    return [int(v) for v in values]


def check_layout(packed: PackedTokens) -> None:
    """Raise `CorruptPayloadError` unless the layout arrays agree with each other."""
    n = packed.features.shape[0] if packed.features.dim() == 2 else -1
    arrays = (packed.crop, packed.row, packed.col, packed.newline_after)
    if n < 0 or any(a.dim() != 1 or a.shape[0] != n for a in arrays):
        raise CorruptPayloadError("features must be (N, D) and every layout array (N,)")
    if any(a.dtype.is_floating_point or a.dtype.is_complex for a in arrays):
        raise CorruptPayloadError("layout arrays must hold integers")
    crops = packed.grid[0] * packed.grid[1] + 1
    if n and (int(packed.crop.min()) < 0 or int(packed.crop.max()) >= crops
              or int(packed.row.min()) < 0 or int(packed.row.max()) >= packed.side
              or int(packed.col.min()) < 0 or int(packed.col.max()) >= packed.side):
        raise CorruptPayloadError("a token's crop, row or column is outside the grid")
