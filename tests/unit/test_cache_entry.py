"""Per-image cache entries: serving any question from the entry equals selecting directly."""

import pytest
import torch

from hero_core.cache import (
    ENTRY_KIND,
    EntryShape,
    RankedEntry,
    build_entry,
    check_entry,
    entry_from_bytes,
    entry_to_bytes,
    request_fingerprint,
    select_from_entry,
    tokens_key,
)
from hero_core.errors import CorruptPayloadError
from hero_core.methods import METHODS, RankedMethod, create_method
from hero_core.packing import pack_tokens
from hero_core.serialization import decode_record, encode_record
from tests.unit.test_methods import GRIDS, question, synthetic

RANKED = [name for name, cls in METHODS.items() if issubclass(cls, RankedMethod)]


@pytest.mark.parametrize("name", RANKED)
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_cached_entry_serves_every_question_like_the_uncached_path(name, grid_name):
    crops, grid = synthetic(GRIDS[grid_name], seed=4)
    method = create_method(name)
    stored = entry_to_bytes(build_entry(method.rank(crops, grid), crops.features, grid,
                                        torch.float32), method.compute_hash())
    entry = entry_from_bytes(stored, method.compute_hash())
    for seed in range(3):
        for ratio in (1.0, 0.222, 0.111, 0.056):
            q = question(seed)
            cached = select_from_entry(entry, method, entry.grid(grid_tiling()), ratio, q)
            direct = pack_tokens(method.select(crops, grid, ratio, q), crops.features, grid)
            assert torch.equal(cached.features, direct.features)
            for field in ("crop", "row", "col", "newline_after"):
                assert torch.equal(getattr(cached, field), getattr(direct, field))


def grid_tiling():
    from hero_core.tiling import TilingSpec

    return TilingSpec()


def test_entry_cast_to_fp16_equals_uncached_features_cast_to_fp16():
    crops, grid = synthetic(GRIDS["2x2"], seed=1)
    hero = create_method("hero")
    entry = build_entry(hero.rank(crops, grid), crops.features, grid, torch.float16)
    cached = select_from_entry(entry, hero, grid, 0.111, question(0))
    direct = pack_tokens(hero.select(crops, grid, 0.111, question(0)), crops.features, grid)
    assert torch.equal(cached.features, direct.features.half())


def test_entry_for_another_method_or_corrupt_bytes_is_refused():
    crops, grid = synthetic(GRIDS["2x2"])
    hero = create_method("hero")
    data = entry_to_bytes(build_entry(hero.rank(crops, grid), crops.features, grid,
                                      torch.float16), hero.compute_hash())
    with pytest.raises(CorruptPayloadError, match="method"):
        entry_from_bytes(data, create_method("hero", object_layer=3).compute_hash())
    with pytest.raises(CorruptPayloadError):
        entry_from_bytes(data[:-10], hero.compute_hash())


def test_keys_separate_images_encoders_methods_and_requests():
    keys = {tokens_key("a" * 64, "enc1", "hero-1"), tokens_key("b" * 64, "enc1", "hero-1"),
            tokens_key("a" * 64, "enc2", "hero-1"), tokens_key("a" * 64, "enc1", "hero-2"),
            tokens_key("a" * 64, "enc1", "random-1", request_fingerprint(0.1, None)),
            tokens_key("a" * 64, "enc1", "random-1", request_fingerprint(0.2, None))}
    assert len(keys) == 6


SHAPE = EntryShape(feature_dim=16, dtype=torch.float32, embed_dim=32, max_pixels=50_000_000)


@pytest.mark.parametrize("name", RANKED)
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_what_a_reader_expects_is_exactly_what_rank_makes(name, grid_name):
    """`ranking_lengths` and `state_shapes` describe `rank`'s output, so `check_entry`
    accepts every entry the encoder makes (and only entries of that shape)."""
    crops, grid = synthetic(GRIDS[grid_name], seed=2)
    method = create_method(name)
    ranking = method.rank(crops, grid)
    assert ranking.caps == method.ranking_lengths(grid)
    shapes = method.state_shapes(grid, crops.image_embeds.shape[1])
    assert {k: (tuple(v.shape), v.dtype) for k, v in ranking.state.items()} == shapes
    entry = build_entry(ranking, crops.features, grid, torch.float32)
    assert check_entry(entry, method, grid_tiling(), SHAPE) == grid


def hero_entry() -> tuple[RankedEntry, object]:
    crops, grid = synthetic(GRIDS["2x2"], seed=3)
    hero = create_method("hero")
    return build_entry(hero.rank(crops, grid), crops.features, grid, torch.float32), hero


def nan_at(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 2] = float("nan")
    return tensor


@pytest.mark.parametrize("change, message", [
    (lambda e: setattr(e, "image_size", (0, 0)), "outside 1..50000000 pixels"),
    (lambda e: setattr(e, "image_size", (-700, 710)), "outside 1..50000000 pixels"),
    (lambda e: setattr(e, "image_size", (100_000, 100_000)), "outside 1..50000000 pixels"),
    (lambda e: setattr(e, "image_size", (336, 336)), "the grid has"),
    (lambda e: e.state.__setitem__("embeds", e.state["embeds"][:, :16]), "state embeds"),
    (lambda e: e.state.__setitem__("embeds", e.state["embeds"].double()), "state embeds"),
    (lambda e: e.state.__setitem__("embeds", nan_at(e.state["embeds"])), "not finite"),
    (lambda e: e.state.pop("embeds"), "state holds"),
    (lambda e: e.features.__setitem__(1, e.features[1][:, :8]), "features"),
    (lambda e: e.features.__setitem__(1, e.features[1].half()), "features"),
    (lambda e: e.features.__setitem__(2, nan_at(e.features[2])), "not finite"),
    (lambda e: (e.order.__setitem__(0, e.order[0][:-1]),
                e.features.__setitem__(0, e.features[0][:-1])), "ranks 575 tokens"),
])
def test_check_entry_refuses_an_entry_unlike_what_the_encoder_makes(change, message):
    entry, hero = hero_entry()
    change(entry)
    with pytest.raises(CorruptPayloadError, match=message):
        check_entry(entry, hero, grid_tiling(), SHAPE)


@pytest.mark.parametrize("size", [[0.0, 5], [True, 5], "5x5", [5], None])
def test_an_entry_whose_image_size_is_not_two_integers_does_not_decode(size):
    entry, hero = hero_entry()
    data = entry_to_bytes(entry, hero.compute_hash())
    meta, tensors = decode_record(data, ENTRY_KIND)
    meta["image_size"] = size
    with pytest.raises(CorruptPayloadError, match="image_size"):
        entry_from_bytes(encode_record(ENTRY_KIND, meta, tensors), hero.compute_hash())
