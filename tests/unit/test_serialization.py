import json
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hero_core.errors import CorruptPayloadError
from hero_core.packing import PackedTokens
from hero_core.serialization import (
    CRC_KEY,
    decode_record,
    encode_record,
    json_depth,
    packed_from_bytes,
    packed_to_bytes,
)


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


def header_of(record: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(record[:8], "little")
    return json.loads(record[8:8 + length]), record[8 + length:]


def forged(header: dict, data: bytes) -> bytes:
    """A record of `header` over `data`, both CRC-32s recomputed as a writer who knows the
    format would."""
    fields = header.setdefault("__metadata__", {})
    fields.pop(CRC_KEY, None)
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    canonical = json.dumps({"meta": fields, "tensors": rest}, sort_keys=True).encode()
    fields[CRC_KEY] = f"{zlib.crc32(canonical)}:{zlib.crc32(data)}"
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def deep(depth: int) -> dict:
    tree: dict = {}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


@pytest.mark.parametrize("depth, message", [(30_000, "nested deeper than 8"),
                                            (100_000, "above 65536")])
def test_a_deeply_nested_header_is_refused_before_it_is_parsed(depth, message):
    """Nesting that would exhaust the recursive JSON parser (a RecursionError) is a
    typed error: by depth, or by size first."""
    record = packed_to_bytes(packed())
    length = int.from_bytes(record[:8], "little")
    text = b'{"x":' + b"[" * depth + b"]" * depth + b"," + record[9:8 + length]
    with pytest.raises(CorruptPayloadError, match=message):
        decode_record(len(text).to_bytes(8, "little") + text + record[8 + length:],
                      "packed_tokens")


@pytest.mark.parametrize("change, message", [
    (lambda h: h.__setitem__("x", deep(8)), "header is nested deeper"),
    (lambda h: h["__metadata__"].__setitem__(
        "hero.meta", json.dumps({"image_size": [1, 2], "x": deep(8)})), "metadata is nested"),
    (lambda h: h["__metadata__"].__setitem__("pad", "x" * (64 << 10)), "above 65536"),
    (lambda h: h["__metadata__"].__setitem__("hero.meta", {"image_size": [1, 2]}),
     "map names to strings"),
    (lambda h: h.__setitem__("features", [1, 2]), "each tensor in a mapping"),
    (lambda h: h["features"].__setitem__("shape", [2 ** 62, 2 ** 62]), "does not parse"),
    (lambda h: h["features"].__setitem__("dtype", "I64"), "does not parse"),
])
def test_headers_of_the_wrong_shape_size_or_depth_are_refused_with_a_valid_crc(change,
                                                                               message):
    header, data = header_of(packed_to_bytes(packed()))
    change(header)
    with pytest.raises(CorruptPayloadError, match=message):
        decode_record(forged(header, data), "packed_tokens")


def test_a_forged_header_that_changes_nothing_still_decodes():
    """`forged` recomputes the CRCs exactly as the reader checks them."""
    original = packed()
    header, data = header_of(packed_to_bytes(original))
    restored = packed_from_bytes(forged(header, data))
    assert torch.equal(restored.features, original.features)


@pytest.mark.parametrize("name, value", [
    ("image_size", [480.0, 640]), ("image_size", [True, 640]), ("image_size", "480x640"),
    ("image_size", [480]), ("grid", ["2", 2]), ("side", 24.0), ("full_tokens", None),
])
def test_packed_metadata_of_the_wrong_type_is_refused(name, value):
    header, data = header_of(packed_to_bytes(packed()))
    meta = json.loads(header["__metadata__"]["hero.meta"])
    meta[name] = value
    header["__metadata__"]["hero.meta"] = json.dumps(meta)
    with pytest.raises(CorruptPayloadError, match=name):
        packed_from_bytes(forged(header, data))


def test_json_depth_counts_structure_not_brackets_inside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[\\"]]]]"}]}') == 3
    assert json_depth(b'"[[[["') == 0 and json_depth(b"") == 0
