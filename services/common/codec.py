"""The one place that converts between protobuf messages and hero_core structures.

Features travel as a `TensorHeader` plus `TensorChunk`s of at most `MAX_CHUNK_BYTES`
each, so no gRPC message limit is ever near, whatever the token count.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from hero.common.v1 import tensor_pb2 as common_pb2

from hero_core.dtypes import DTYPES
from hero_core.errors import CorruptPayloadError, InvalidInputError, LayoutError
from hero_core.packing import PackedTokens

MAX_CHUNK_BYTES = 1 << 20
"""Largest chunk of tensor data in one message (1 MiB)."""
MAX_CHUNKS = 1 << 16
"""Most chunks one tensor may be split into."""

DTYPE_NAMES: dict[str, int] = {
    "float32": common_pb2.DTYPE_FLOAT32, "float16": common_pb2.DTYPE_FLOAT16,
    "bfloat16": common_pb2.DTYPE_BFLOAT16, "int8": common_pb2.DTYPE_INT8,
}
"""Wire dtype enum by name (int8 is quantised float features, not a tensor dtype)."""
FLOAT_DTYPES: dict[int, torch.dtype] = {
    DTYPE_NAMES[name]: DTYPES[name] for name in ("float32", "float16", "bfloat16")}
ELEMENT_BYTES = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_FLOAT16: 2,
                 common_pb2.DTYPE_BFLOAT16: 2, common_pb2.DTYPE_INT8: 1}


def dtype_name(dtype: int) -> str:
    return common_pb2.DType.Name(dtype) if dtype in common_pb2.DType.values() else str(dtype)


def quantize_int8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (values `(N, D)` int8, scales `(N,)` float32)."""
    x = features.float()
    scales = (x.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(x / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def encode_tensor(features: torch.Tensor, dtype: int,
                  chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[common_pb2.TensorHeader,
                                                                 list[common_pb2.TensorChunk]]:
    """`(N, D)` features as a tensor header plus chunks in the wire dtype `dtype`."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
    scales = b""
    if dtype == common_pb2.DTYPE_INT8:
        values, row_scales = quantize_int8(features)
        scales = row_scales.numpy().tobytes()
    elif dtype in FLOAT_DTYPES:
        values = features.detach().to(FLOAT_DTYPES[dtype])
    else:
        raise InvalidInputError(f"cannot encode features as {dtype_name(dtype)}")
    data = values.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    chunks = [common_pb2.TensorChunk(index=i, data=data[start:start + chunk_bytes])
              for i, start in enumerate(range(0, len(data), chunk_bytes))]
    header = common_pb2.TensorHeader(dtype=dtype, shape=list(features.shape),
                                     total_bytes=len(data), num_chunks=len(chunks),
                                     crc32=zlib.crc32(data), row_scales=scales)
    return header, chunks


def check_tensor_header(header: common_pb2.TensorHeader, feature_dim: int,
                        accepted: frozenset[int], max_tokens: int) -> None:
    """Raise `InvalidInputError` unless the header describes features this model takes."""
    if header.dtype not in accepted:
        names = ", ".join(sorted(dtype_name(d) for d in accepted))
        raise InvalidInputError(f"features dtype {dtype_name(header.dtype)} is not accepted; "
                                f"send one of {names}")
    shape = list(header.shape)
    if len(shape) != 2 or shape[1] != feature_dim:
        raise LayoutError(f"features shape must be (tokens, {feature_dim}) for this model, "
                          f"got {tuple(shape)}")
    if not 0 < shape[0] <= max_tokens:
        raise LayoutError(f"features must hold 1..{max_tokens} tokens, got {shape[0]}")
    expected = shape[0] * shape[1] * ELEMENT_BYTES[header.dtype]
    if header.total_bytes != expected:
        raise LayoutError(f"total_bytes must be {expected} for shape {tuple(shape)} as "
                          f"{dtype_name(header.dtype)}, got {header.total_bytes}")
    needed = -(-expected // MAX_CHUNK_BYTES)
    most = min(expected, MAX_CHUNKS)
    if not needed <= header.num_chunks <= most:
        raise LayoutError(f"num_chunks must be between {needed} and {most} for {expected} "
                          f"bytes in chunks of at most {MAX_CHUNK_BYTES}")
    if header.dtype == common_pb2.DTYPE_INT8 and len(header.row_scales) != 4 * shape[0]:
        raise LayoutError("int8 features need one float32 scale per row in row_scales")


class ChunkAssembler:
    """Collects tensor chunks, enforcing order, sizes, count and checksum."""

    def __init__(self, header: common_pb2.TensorHeader):
        self.header = header
        self.parts: list[bytes] = []
        self.size = 0

    @property
    def complete(self) -> bool:
        return bool(len(self.parts) == self.header.num_chunks)

    def add(self, chunk: common_pb2.TensorChunk) -> None:
        expected = len(self.parts)
        if expected >= self.header.num_chunks:
            raise CorruptPayloadError(f"chunk {chunk.index} arrived after all "
                                      f"{self.header.num_chunks} chunks")
        if chunk.index != expected:
            raise CorruptPayloadError(f"chunk {chunk.index} arrived where chunk {expected} was "
                                      "expected; send chunks in order without gaps")
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise CorruptPayloadError(f"chunk {chunk.index} is {len(chunk.data)} bytes; "
                                      f"chunks must be at most {MAX_CHUNK_BYTES}")
        self.size += len(chunk.data)
        if self.size > self.header.total_bytes:
            raise CorruptPayloadError("chunks hold more bytes than total_bytes")
        self.parts.append(chunk.data)

    def tensor(self) -> torch.Tensor:
        """The assembled `(N, D)` features (int8 dequantised to float32)."""
        if not self.complete:
            raise CorruptPayloadError(f"stream ended after {len(self.parts)} of "
                                      f"{self.header.num_chunks} chunks")
        data = b"".join(self.parts)
        if len(data) != self.header.total_bytes:
            raise CorruptPayloadError(f"chunks hold {len(data)} bytes, total_bytes says "
                                      f"{self.header.total_bytes}")
        if zlib.crc32(data) != self.header.crc32:
            raise CorruptPayloadError("features fail their CRC-32 checksum; resend them")
        return decode_tensor(self.header, data)


def decode_tensor(header: common_pb2.TensorHeader, data: bytes) -> torch.Tensor:
    shape = [int(s) for s in header.shape]
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if header.dtype == common_pb2.DTYPE_INT8:
        values = raw.view(torch.int8).reshape(shape).float()
        scales = torch.frombuffer(bytearray(header.row_scales), dtype=torch.float32)
        return values * scales[:, None]
    return raw.view(FLOAT_DTYPES[header.dtype]).reshape(shape)


def layout_message(packed: PackedTokens) -> common_pb2.TokenLayout:
    newline = torch.nonzero(packed.newline_after).flatten().tolist()
    return common_pb2.TokenLayout(
        image_height=packed.image_size[0], image_width=packed.image_size[1],
        grid_rows=packed.grid[0], grid_cols=packed.grid[1], tokens_per_side=packed.side,
        full_tokens=packed.full_tokens, crop=packed.crop.tolist(), row=packed.row.tolist(),
        col=packed.col.tolist(), newline_after=newline)


def packed_from_layout(layout: common_pb2.TokenLayout, features: torch.Tensor) -> PackedTokens:
    """PackedTokens from a layout message and assembled features (checked by the caller)."""
    n = features.shape[0]
    for name in ("crop", "row", "col"):
        if len(getattr(layout, name)) != n:
            raise LayoutError(f"layout.{name} has {len(getattr(layout, name))} entries for "
                              f"{n} tokens")
    limit = 1 << 15
    if any(v >= limit for name in ("crop", "row", "col") for v in getattr(layout, name)):
        raise LayoutError("layout crop, row and col values must be small grid indices")
    newline = torch.zeros(n, dtype=torch.bool)
    indices = torch.tensor(list(layout.newline_after), dtype=torch.long)
    if indices.numel() and (int(indices.max()) >= n or indices.unique().numel() != len(indices)):
        raise LayoutError("layout.newline_after must list distinct token indices")
    newline[indices] = True
    return PackedTokens(
        features=features, crop=torch.tensor(list(layout.crop), dtype=torch.int16),
        row=torch.tensor(list(layout.row), dtype=torch.int16),
        col=torch.tensor(list(layout.col), dtype=torch.int16), newline_after=newline,
        image_size=(layout.image_height, layout.image_width),
        grid=(layout.grid_rows, layout.grid_cols), side=layout.tokens_per_side,
        full_tokens=layout.full_tokens)


def packed_messages(packed: PackedTokens, dtype: int, chunk_bytes: int = MAX_CHUNK_BYTES
                    ) -> tuple[common_pb2.TokenLayout, common_pb2.TensorHeader,
                               Iterator[common_pb2.TensorChunk]]:
    """Layout, tensor header and chunk iterator for sending `packed`."""
    header, chunks = encode_tensor(packed.features, dtype, chunk_bytes)
    return layout_message(packed), header, iter(chunks)
