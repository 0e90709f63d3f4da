"""Untrusted bytes into every decoder: nothing but typed errors may come out."""

import io

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hero_core.cache import build_entry, entry_from_bytes, entry_to_bytes
from hero_core.config import Limits
from hero_core.errors import CorruptPayloadError, InvalidInputError
from hero_core.image import decode_image
from hero_core.methods import create_method
from tests.unit.test_methods import GRIDS, synthetic


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()
HERO = create_method("hero")
crops, grid = synthetic(GRIDS["1x2"], seed=0, dim=8)
ENTRY = entry_to_bytes(build_entry(HERO.rank(crops, grid), crops.features, grid, torch.float16),
                       HERO.compute_hash())


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048),
                 st.builds(mutate, st.just(PNG), edits, st.none() | st.integers(0, len(PNG)))))
def test_image_decoding_only_raises_typed_errors(data):
    try:
        image = decode_image(data, Limits(max_image_pixels=10_000))
    except InvalidInputError:
        return
    assert image.mode == "RGB" and image.width * image.height <= 10_000


@settings(max_examples=300, deadline=None)
@given(edits, st.none() | st.integers(0, len(ENTRY)))
def test_cache_entry_decoding_only_raises_typed_errors(changes, cut):
    data = mutate(ENTRY, changes, cut)
    try:
        entry = entry_from_bytes(data, HERO.compute_hash())
    except CorruptPayloadError:
        return
    # Whatever decodes cleanly is the original entry: header and payload are checksummed.
    original = entry_from_bytes(ENTRY, HERO.compute_hash())
    assert entry.image_size == original.image_size and entry.state.keys() == original.state.keys()
    assert all(torch.equal(a, b) for a, b in zip(entry.order, original.order, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(entry.features, original.features,
                                                  strict=True))
