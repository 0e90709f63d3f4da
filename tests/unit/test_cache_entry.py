"""Per-image cache entries: serving any question from the entry equals selecting directly."""

import pytest
import torch

from hero_core.cache import (
    build_entry,
    entry_from_bytes,
    entry_to_bytes,
    request_fingerprint,
    select_from_entry,
    tokens_key,
)
from hero_core.errors import CorruptPayloadError
from hero_core.methods import METHODS, RankedMethod, create_method
from hero_core.packing import pack_tokens
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
