import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hero_core.errors import CorruptPayloadError
from hero_core.packing import PackedTokens
from hero_core.serialization import decode_record, encode_record, packed_from_bytes, packed_to_bytes


def packed(dtype=torch.float32, n=37, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedTokens(
        features=torch.randn(n, dim, generator=g).to(dtype),
        crop=torch.randint(0, 5, (n,), generator=g).to(torch.int16),
        row=torch.randint(0, 24, (n,), generator=g).to(torch.int16),
        col=torch.randint(0, 24, (n,), generator=g).to(torch.int16),
        newline_after=torch.rand(n, generator=g) > 0.8,
        image_size=(480, 640), grid=(2, 2), side=24, full_tokens=2340,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_tokens_round_trip_bit_exactly(dtype):
    original = packed(dtype)
    restored = packed_from_bytes(packed_to_bytes(original))
    assert restored.features.dtype == dtype
    assert torch.equal(restored.features.view(torch.uint8), original.features.view(torch.uint8))
    for name in ("crop", "row", "col", "newline_after"):
        assert torch.equal(getattr(restored, name), getattr(original, name))
    assert (restored.image_size, restored.grid, restored.side, restored.full_tokens) == (
        original.image_size, original.grid, original.side, original.full_tokens)


def test_empty_selection_round_trips():
    restored = packed_from_bytes(packed_to_bytes(packed(n=0)))
    assert restored.num_tokens == 0


def test_serialised_size_is_the_raw_tensors_plus_a_small_header():
    data = packed_to_bytes(packed(torch.float16, n=320, dim=1024))
    raw = 320 * 1024 * 2 + 320 * (2 + 2 + 2 + 1)
    assert raw < len(data) < raw + 1024


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1],
    lambda b: b[:10],
    lambda b: b"XXXX" + b[4:],
    lambda b: b[:4] + struct.pack("<H", 99) + b[6:],
    lambda b: b[:20] + bytes([b[20] ^ 0x01]) + b[21:],  # a bit in the header
    lambda b: b[:-5] + bytes([b[-5] ^ 0xFF]) + b[-4:],
    lambda b: b"",
])
def test_corrupt_records_raise_a_typed_error(mutate):
    with pytest.raises(CorruptPayloadError):
        packed_from_bytes(mutate(packed_to_bytes(packed())))


def test_a_record_of_another_kind_is_refused():
    data = encode_record("cache_entry", {}, {"x": torch.zeros(2)})
    with pytest.raises(CorruptPayloadError, match="expected 'packed_tokens'"):
        packed_from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_anything_but_a_typed_error(blob):
    with pytest.raises(CorruptPayloadError):
        decode_record(blob, "packed_tokens")
