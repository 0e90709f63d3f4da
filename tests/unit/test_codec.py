import pytest
import torch
from hero.common.v1 import tensor_pb2 as common_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from hero_core.errors import CorruptPayloadError, InvalidInputError, LayoutError
from services.common.codec import (
    MAX_CHUNK_BYTES,
    ChunkAssembler,
    check_tensor_header,
    encode_tensor,
    layout_message,
    packed_from_layout,
)
from tests.unit.test_serialization import packed

ALL = frozenset({common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16,
                 common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_INT8})


def assemble(header, chunks):
    assembler = ChunkAssembler(header)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.tensor()


@pytest.mark.parametrize(("dtype", "torch_dtype"), [(common_pb2.DTYPE_FLOAT32, torch.float32),
                                                    (common_pb2.DTYPE_FLOAT16, torch.float16),
                                                    (common_pb2.DTYPE_BFLOAT16, torch.bfloat16)])
def test_float_tensors_cross_the_wire_bit_exactly(dtype, torch_dtype):
    x = torch.randn(700, 1024)
    header, chunks = encode_tensor(x, dtype)
    assert all(len(c.data) <= MAX_CHUNK_BYTES for c in chunks)
    assert len(chunks) == -(-header.total_bytes // MAX_CHUNK_BYTES) > 1
    assert torch.equal(assemble(header, chunks), x.to(torch_dtype))


def test_int8_rows_are_within_half_a_step():
    x = torch.randn(50, 64) * torch.linspace(0.1, 10, 50)[:, None]
    header, chunks = encode_tensor(x, common_pb2.DTYPE_INT8)
    y = assemble(header, chunks)
    step = x.abs().amax(1, keepdim=True) / 127
    assert bool(((y - x).abs() <= step / 2 + 1e-6).all())
    assert header.total_bytes == 50 * 64 and len(header.row_scales) == 50 * 4


def test_layout_round_trips():
    original = packed()
    header, chunks = encode_tensor(original.features, common_pb2.DTYPE_FLOAT32)
    restored = packed_from_layout(layout_message(original), assemble(header, chunks))
    for name in ("crop", "row", "col", "newline_after"):
        assert torch.equal(getattr(restored, name), getattr(original, name))
    assert restored.image_size == original.image_size and restored.grid == original.grid


def header_for(shape=(10, 64), wire=common_pb2.DTYPE_FLOAT16, **changes):
    header, _ = encode_tensor(torch.zeros(shape), wire)
    for key, value in changes.items():
        setattr(header, key, value)
    return header


@pytest.mark.parametrize(("header", "error", "message"), [
    (header_for(dtype=0), InvalidInputError,
     "DTYPE_UNSPECIFIED is not accepted"),
    (header_for(shape=(10, 32)), LayoutError, r"\(tokens, 64\)"),
    (header_for(total_bytes=7), LayoutError, "total_bytes must be 1280"),
    (header_for(num_chunks=0), LayoutError, "num_chunks"),
])
def test_bad_tensor_headers_are_named(header, error, message):
    with pytest.raises(error, match=message):
        check_tensor_header(header, 64, ALL, 8192)


def test_chunks_out_of_order_missing_or_corrupt():
    header, chunks = encode_tensor(torch.randn(1000, 1024), common_pb2.DTYPE_FLOAT32)
    with pytest.raises(CorruptPayloadError, match="chunk 1 arrived where chunk 0"):
        assemble(header, [chunks[1], chunks[0]])
    with pytest.raises(CorruptPayloadError, match="stream ended after 2 of 4"):
        assemble(header, chunks[:2])
    bad = common_pb2.TensorChunk(index=0, data=bytes([chunks[0].data[0] ^ 1]) + chunks[0].data[1:])
    with pytest.raises(CorruptPayloadError, match="CRC-32"):
        assemble(header, [bad, *chunks[1:]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_chunks_only_ever_raise_typed_errors(blobs):
    header = header_for(shape=(2, 8), wire=common_pb2.DTYPE_FLOAT32)
    assembler = ChunkAssembler(header)
    try:
        for i, blob in enumerate(blobs):
            assembler.add(common_pb2.TensorChunk(index=i, data=blob))
        assembler.tensor()
    except CorruptPayloadError:
        pass
