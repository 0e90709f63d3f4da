"""Versioned, checksummed bytes for token structures (wire payloads and cache values).

A record is `MAGIC | u16 version | u32 header length | u32 header CRC-32 | header JSON |
payload`. The header names the record kind, its metadata and, for every tensor, dtype,
shape and byte span in the payload, plus a CRC-32 of the payload, so a flipped bit
anywhere is caught. Tensors are stored raw in
little-endian byte order, so a round trip is bit-exact for every dtype (bf16
included). Anything that does not parse raises `CorruptPayloadError`.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any

import torch

from hero_core.errors import CorruptPayloadError
from hero_core.packing import PackedTokens

MAGIC = b"HERO"
VERSION = 2
_PREFIX = struct.Struct("<4sHII")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool, "float64": torch.float64,
}
_NAMES = {v: k for k, v in DTYPES.items()}
if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("hero_core.serialization needs a little-endian host")


def encode_record(kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named tensors and JSON-able metadata as one self-describing record."""
    specs, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        specs[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "offset": offset, "nbytes": len(raw)}
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    header = json.dumps({"kind": kind, "meta": meta, "tensors": specs,
                         "payload_bytes": len(payload), "crc32": zlib.crc32(payload)},
                        separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header)) + header + payload


def decode_record(data: bytes, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a record of `kind`; returns (metadata, tensors). Tensors own their memory."""
    if len(data) < _PREFIX.size:
        raise CorruptPayloadError(f"record is {len(data)} bytes, shorter than its prefix")
    magic, version, header_len, header_crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptPayloadError("record does not start with the HERO magic bytes")
    if version != VERSION:
        raise CorruptPayloadError(f"record version {version} is not supported (want {VERSION})")
    start = _PREFIX.size + header_len
    if zlib.crc32(data[_PREFIX.size:start]) != header_crc:
        raise CorruptPayloadError("record header is truncated or fails its checksum")
    try:
        header = json.loads(data[_PREFIX.size:start])
        if header["kind"] != kind:
            raise CorruptPayloadError(f"record holds {header['kind']!r}, expected {kind!r}")
        payload = memoryview(data)[start:]  # no copy: checked, then copied once per tensor
        if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["crc32"]:
            raise CorruptPayloadError("record payload is truncated or fails its checksum")
        tensors = {name: _tensor(payload, spec) for name, spec in header["tensors"].items()}
        return dict(header["meta"]), tensors
    except CorruptPayloadError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError) as exc:
        raise CorruptPayloadError(f"record header is malformed: {exc}") from exc


def _tensor(payload: memoryview, spec: dict[str, Any]) -> torch.Tensor:
    dtype = DTYPES[spec["dtype"]]
    shape = [int(s) for s in spec["shape"]]
    start, nbytes = int(spec["offset"]), int(spec["nbytes"])
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or nbytes != numel * itemsize or start < 0 \
            or start + nbytes > len(payload):
        raise CorruptPayloadError(f"tensor spec {spec} does not fit the payload")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(payload[start:start + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


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
    try:
        packed = PackedTokens(
            features=t["features"], crop=t["crop"], row=t["row"], col=t["col"],
            newline_after=t["newline_after"], image_size=(int(meta["image_size"][0]),
                                                          int(meta["image_size"][1])),
            grid=(int(meta["grid"][0]), int(meta["grid"][1])), side=int(meta["side"]),
            full_tokens=int(meta["full_tokens"]))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CorruptPayloadError(f"packed-token record lacks a field: {exc}") from exc
    check_layout(packed)
    return packed


def check_layout(packed: PackedTokens) -> None:
    """Raise `CorruptPayloadError` unless the layout arrays agree with each other."""
    n = packed.features.shape[0] if packed.features.dim() == 2 else -1
    arrays = (packed.crop, packed.row, packed.col, packed.newline_after)
    if n < 0 or any(a.dim() != 1 or a.shape[0] != n for a in arrays):
        raise CorruptPayloadError("features must be (N, D) and every layout array (N,)")
    crops = packed.grid[0] * packed.grid[1] + 1
    if n and (int(packed.crop.min()) < 0 or int(packed.crop.max()) >= crops
              or int(packed.row.min()) < 0 or int(packed.row.max()) >= packed.side
              or int(packed.col.min()) < 0 or int(packed.col.max()) >= packed.side):
        raise CorruptPayloadError("a token's crop, row or column is outside the grid")
