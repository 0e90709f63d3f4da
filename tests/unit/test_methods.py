"""The pruning methods on constructed inputs: budgets, caps, prefixes, stability."""

import dataclasses

import pytest
import torch

from hero_core.encoder import EncodedCrops
from hero_core.errors import UnknownMethodError
from hero_core.methods import METHODS, RankedMethod, create_method
from hero_core.methods.base import rank_valid
from hero_core.methods.hero import Hero, HeroConfig, thumbnail_ranking, tile_importance
from hero_core.tiling import TilingSpec, plan_grid

GRIDS = {"2x2": (700, 710), "1x2": (300, 601), "2x1": (601, 300), "1x3": (300, 1001),
         "3x1": (1001, 300)}
LAYERS = (0, 11, 22)


def synthetic(size, seed=0, dim=16, proj=32):
    grid = plan_grid(size, TilingSpec())
    g = torch.Generator().manual_seed(seed)
    n, t = grid.num_crops, grid.tokens_per_crop
    attention = {layer: torch.rand(n, t, generator=g).softmax(-1) * 16 for layer in LAYERS}
    crops = EncodedCrops(
        features=torch.randn(n, t, dim, generator=g),
        attention=attention,
        keys={22: torch.randn(n, t, dim, generator=g)},
        image_embeds=torch.nn.functional.normalize(torch.randn(n, proj, generator=g), dim=-1),
    )
    return crops, grid


def question(seed, proj=32):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.nn.functional.normalize(torch.randn(proj, generator=g), dim=0)


def expected_budget(name, ratio, grid):
    valid = grid.valid_mask().sum().item()
    if name == "full":
        return valid
    if name == "hired":
        return min(int(grid.num_crops * 576 * ratio), valid)
    return min(int(ratio * 576 * grid.num_crops + 0.5), valid)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("ratio", [1.0, 0.222, 0.111, 0.056, 0.01])
def test_every_method_obeys_its_budget(name, grid_name, ratio):
    crops, grid = synthetic(GRIDS[grid_name])
    selection = create_method(name).select(crops, grid, ratio, question(0))
    valid = grid.valid_mask()
    assert len(selection.indices) == grid.num_crops
    for i, idx in enumerate(selection.indices):
        assert idx.unique().numel() == idx.numel(), "a token is kept twice"
        assert bool(valid[i, idx].all()), "a padding token was kept"
    total = selection.total
    if name in ("fastervlm", "visionzip"):
        per_crop = min(int(ratio * 576 + 0.5), 576)
        assert total <= expected_budget(name, ratio, grid)
        assert all(c <= per_crop for c in selection.counts)
    else:
        assert total == expected_budget(name, ratio, grid)


@pytest.mark.parametrize("name", [n for n, c in METHODS.items() if issubclass(c, RankedMethod)])
def test_kept_sets_are_prefixes_of_the_image_only_rankings(name):
    crops, grid = synthetic(GRIDS["2x2"], seed=3)
    method = create_method(name)
    ranking = method.rank(crops, grid)
    for q in (None, question(1), question(2)):
        selection = method.select(crops, grid, 0.111, q)
        for order, kept in zip(ranking.order, selection.indices, strict=True):
            assert torch.equal(kept, order[: kept.numel()])


def test_hero_question_changes_only_tile_budgets():
    crops, grid = synthetic(GRIDS["2x2"], seed=5)
    hero = Hero()
    ranking = hero.rank(crops, grid)
    all_budgets = [hero.budgets(ranking, grid, 0.111, question(s)) for s in range(20)]
    thumbs = {b[0] for b in all_budgets}
    splits = {tuple(b[1:]) for b in all_budgets}
    assert len(thumbs) == 1, "the thumbnail budget moved with the question"
    assert len(splits) > 1, "the question never changed a tile budget"
    (thumb,) = thumbs
    assert all(sum(s) == 320 - thumb for s in splits)


def test_hero_budgets_sum_exactly_and_respect_caps():
    crops, grid = synthetic(GRIDS["1x3"], seed=7)  # 1x3 tiles have padding rows
    for cap in (576, 100, 40):
        hero = Hero(HeroConfig(max_tokens_per_crop=cap))
        ranking = hero.rank(crops, grid)
        valid = grid.valid_mask().sum(1).tolist()
        for ratio in (1.0, 0.5, 0.222, 0.111, 0.056):
            budgets = hero.budgets(ranking, grid, ratio, question(0))
            limit = [min(v, cap) for v in valid]
            assert all(b <= lim for b, lim in zip(budgets, limit, strict=True))
            assert sum(budgets) == min(int(ratio * 576 * 4 + 0.5), sum(limit))


def test_hero_at_full_retention_keeps_every_valid_token():
    crops, grid = synthetic(GRIDS["3x1"])
    selection = Hero().select(crops, grid, 1.0, question(0))
    assert selection.counts == grid.valid_mask().sum(1).tolist()


def test_relevance_favours_the_tile_the_question_matches():
    crops, grid = synthetic(GRIDS["2x2"], seed=11)
    hero = Hero(HeroConfig(saliency_weight=0.0))
    ranking = hero.rank(crops, grid)
    for tile in range(1, 5):
        budgets = hero.budgets(ranking, grid, 0.111, crops.image_embeds[tile])
        assert max(range(1, 5), key=lambda i: budgets[i]) == tile


def test_tile_importance_without_question_is_saliency_only():
    embeds = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    imp = tile_importance(embeds, None, 0.5)
    assert torch.argmax(imp) == torch.argmax(embeds[1:] @ embeds[0])


def test_ranking_ties_are_broken_by_lower_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    valid = torch.tensor([True, True, True, True, True])
    assert rank_valid(scores, valid).tolist() == [1, 3, 0, 2, 4]
    valid[3] = False
    assert rank_valid(scores, valid).tolist() == [1, 0, 2, 4]


def test_thumbnail_ranking_puts_artifacts_first_then_stage_one_order():
    stage1 = torch.linspace(1.0, 0.0, 576)  # prefers low indices
    stage2 = torch.full((576,), 1.0 / 576)
    stage2[[500, 300]] = torch.tensor([0.4, 0.3])  # two register-like outliers
    order = thumbnail_ranking(stage1, stage2, artifact_factor=10.0, max_artifacts=64)
    assert order[:2].tolist() == [500, 300]
    assert order[2:5].tolist() == [0, 1, 2]
    assert sorted(order.tolist()) == list(range(576))
    capped = thumbnail_ranking(stage1, stage2, artifact_factor=10.0, max_artifacts=1)
    assert capped[:2].tolist() == [500, 0]


def test_selection_is_reproducible():
    crops, grid = synthetic(GRIDS["2x2"], seed=2)
    for name in METHODS:
        a = create_method(name).select(crops, grid, 0.111, question(0))
        b = create_method(name).select(crops, grid, 0.111, question(0))
        assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))


def test_visionzip_merges_context_into_new_features():
    crops, grid = synthetic(GRIDS["2x2"], seed=4)
    selection = create_method("visionzip").select(crops, grid, 0.222, None)
    merged = selection.features[0]
    assert merged is not None
    original = crops.features[0][selection.indices[0]]
    differs = ~torch.isclose(merged, original).all(1)
    assert 0 < int(differs.sum()) <= round(0.222 * 576 * 10 / 64) + 1


def test_unknown_method_is_a_clear_error():
    with pytest.raises(UnknownMethodError, match="choose one of"):
        create_method("nope")


def test_config_hash_tracks_output_affecting_fields():
    base = create_method("hero")
    same = create_method("hero")
    other = create_method("hero", object_layer=10)
    assert base.compute_hash() == same.compute_hash()
    assert base.compute_hash() != other.compute_hash()
    assert create_method("fastervlm").compute_hash() != create_method("globalcom2").compute_hash()
    assert dataclasses.is_dataclass(base.config)


def test_invalid_config_values_are_refused():
    from hero_core.errors import ConfigError

    with pytest.raises(ConfigError, match="saliency_weight"):
        HeroConfig(saliency_weight=2.0)
    with pytest.raises(ConfigError, match="budget_temperature"):
        HeroConfig(budget_temperature=0.0)
