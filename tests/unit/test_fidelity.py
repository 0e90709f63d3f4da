"""The fidelity benchmark's parts: the task, the answer model, the evaluation plumbing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from evals.fidelity.answer_model import AnswerModel, AnswerModelConfig, Vocabulary, pad_batch
from evals.fidelity.data import (
    COLORS,
    NAMED_KINDS,
    POSITIONS,
    SHAPES,
    MosaicConfig,
    SplitSizes,
    answer_vocabulary,
    build_splits,
    render_cell,
    render_mosaic,
)
from evals.fidelity.evaluation import (
    MethodSpec,
    QuestionTable,
    choose_tokens,
    kept_tokens,
    select_split,
)
from evals.fidelity.features import (
    CropEncoder,
    CropStore,
    FeatureSettings,
    encode_splits,
    fit_projection,
)
from evals.fidelity.prepare import random_tower
from evals.fidelity.relevance import (
    NamedPairs,
    ProjectionConfig,
    retrieval_accuracy,
    train_projection,
)
from evals.fidelity.routing import route_split
from hero_core.dinov2 import dinov2_tiling
from hero_core.encoder import VisionEncoder
from hero_core.relevance import tower_fingerprint
from hero_core.tiling import normalize_crops, tile_image

SIZES = SplitSizes(train_mosaics=6, val_mosaics=2, test_mosaics=3, train_cells=8, val_cells=4,
                   test_cells=6)
CONFIG = MosaicConfig()


@pytest.fixture(scope="module")
def splits():
    return build_splits(SIZES, CONFIG, seed=3)


def test_cell_questions_are_that_cells_own_easy_vqa_questions(splits):
    asked = 0
    for mosaic in (m for split in splits.values() for m in split):
        for question in mosaic.questions:
            if question.cell is None:
                continue
            image = mosaic.cells[question.cell].image
            assert image is not None, "a blank cell was asked about"
            prefix = f"{POSITIONS[question.cell]} cell: "
            assert question.text.startswith(prefix)
            assert (question.text[len(prefix):], question.answer) in image.questions
            asked += 1
    assert asked > 0


def test_mosaic_questions_count_the_shapes_of_all_cells(splits):
    for mosaic in (m for split in splits.values() for m in split):
        shapes = Counter(c.image.shape for c in mosaic.cells if c.image is not None)
        for question in (q for q in mosaic.questions if q.kind in ("exists", "count")):
            shape = next(s for s in SHAPES if s in question.text)
            expected = str(shapes[shape]) if question.kind == "count" else (
                "yes" if shapes[shape] else "no")
            assert question.answer == expected, question


def test_named_questions_ask_about_the_one_cell_holding_their_shape(splits):
    asked = Counter()
    for mosaic in (m for split in splits.values() for m in split):
        for question in (q for q in mosaic.questions if q.kind in NAMED_KINDS):
            shape = next(s for s in SHAPES if s in question.text)
            holders = [i for i, c in enumerate(mosaic.cells)
                       if c.image is not None and c.image.shape == shape]
            assert holders == [question.target], question
            color = mosaic.cells[question.target].image.color
            named = [c for c in COLORS if c in question.text.split()]
            asked_color = named[0] if question.kind != "named-color" else color
            assert len(named) == (0 if question.kind == "named-color" else 1), question
            match = asked_color == color
            expected = {"named-color": color, "named-exists": "yes" if match else "no",
                        "named-count": "1" if match else "0"}[question.kind]
            assert question.answer == expected, question
            asked[question.kind, question.answer] += 1
    # both answers of the yes/no and count kinds occur
    assert asked["named-exists", "yes"] and asked["named-exists", "no"]
    assert asked["named-count", "1"] and asked["named-count", "0"]


def test_splits_share_no_easy_vqa_image(splits):
    ids = {name: {c.image.path for m in split for c in m.cells if c.image is not None}
           for name, split in splits.items()}
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"]


def test_each_tile_of_a_mosaic_is_exactly_its_cell(splits):
    spec = dinov2_tiling(224)
    mosaic = splits["train"][0]
    pixels, grid = tile_image(render_mosaic(mosaic, CONFIG), spec)
    assert (grid.rows, grid.cols) == (2, 2) and pixels.shape[0] == 5
    for i, cell in enumerate(mosaic.cells):
        assert torch.equal(pixels[i + 1], normalize_crops(render_cell(cell, CONFIG)[None], spec)[0])


def model_and_tokens(n: int = 40, dim: int = 8):
    torch.manual_seed(0)
    model = AnswerModel(dim, 5, 256, 20, 7, AnswerModelConfig(width=16, heads=2)).eval()
    feats, crop, pos = torch.randn(n, dim), torch.randint(0, 5, (n,)), torch.randint(0, 256, (n,))
    words = torch.randint(2, 20, (1, 3, 12))
    return model, (feats, crop, pos), words


def logits(model, token_sets, words):
    answers = torch.zeros(words.shape[:2], dtype=torch.long)
    batch = pad_batch(token_sets, words, answers)
    with torch.no_grad():
        return model(batch.features, batch.crop, batch.position, batch.token_mask, batch.words)


def test_answer_model_is_invariant_to_token_order():
    model, (feats, crop, pos), words = model_and_tokens()
    perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, [(feats, crop, pos)], words),
                               logits(model, [(feats[perm], crop[perm], pos[perm])], words))


def test_answer_model_reads_only_the_unmasked_subset():
    model, (feats, crop, pos), words = model_and_tokens()
    subset = (feats[:5], crop[:5], pos[:5])
    alone = logits(model, [subset], words)
    # Padded beside a longer set: the 35 padding slots are masked and change nothing.
    padded = logits(model, [subset, (feats, crop, pos)], words.expand(2, -1, -1))
    torch.testing.assert_close(alone[0], padded[0])
    # The subset's answer differs from the whole set's: the model does read the tokens.
    assert not torch.allclose(alone[0], padded[1])
    assert logits(model, [(feats[:1], crop[:1], pos[:1])], words).isfinite().all()


def test_training_subsets_are_unique_tokens_of_the_mosaic():
    attention = torch.rand(4, 5, 3, 256)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = choose_tokens(attention, AnswerModelConfig(), generator)
        assert chosen.shape[0] == 4 and 1 <= chosen.shape[1] <= 5 * 256
        assert all(row.unique().numel() == row.numel() for row in chosen)


@pytest.fixture(scope="module")
def encoded(splits, tmp_path_factory):
    tower = random_tower()
    encoder = VisionEncoder(tower, feature_layer=-2)
    settings = FeatureSettings(tower_fingerprint(tower), dinov2_tiling(224), key_layer=2)
    store = CropStore(tmp_path_factory.mktemp("crops"))
    small = {"test": splits["test"][:2]}
    first = encode_splits(small, CONFIG, CropEncoder(encoder, settings, store))
    again = CropEncoder(encoder, settings, store)
    second = encode_splits(small, CONFIG, again)
    return first, second, again.encoded_count


def test_cached_crops_equal_freshly_encoded_ones(encoded):
    (table, _), (cached, _), newly_encoded = encoded
    assert newly_encoded == 0
    for name in ("features", "attention", "keys", "embeds"):
        assert torch.equal(getattr(table, name), getattr(cached, name))


def test_full_at_retention_one_keeps_every_token(encoded):
    (table, splits_), _, _ = encoded
    split = splits_["test"]
    projection = fit_projection(table.features, dims=8)
    sets, stats = select_split(MethodSpec("full", "full").create(0), table, split, 1.0,
                               projection)
    for i, (feats, crop, pos) in enumerate(sets):
        assert feats.shape == (5 * 256, 8)
        pairs = set(zip(crop.tolist(), pos.tolist(), strict=True))
        assert pairs == {(c, p) for c in range(5) for p in range(256)}
        expected = projection(table.features[split.rows[i][crop], pos])
        torch.testing.assert_close(feats, expected)
    assert stats.summary()["tokens"] == 5 * 256


def test_hero_at_a_low_ratio_keeps_its_budget(encoded):
    (table, splits_), _, _ = encoded
    projection = fit_projection(table.features, dims=8)
    spec = MethodSpec("hero", "hero", (("artifact_layer", 2), ("object_layer", 1),
                                       ("use_relevance", False)))
    sets, _ = select_split(spec.create(0), table, splits_["test"], 0.111, projection)
    assert all(feats.shape[0] == round(0.111 * 1280) for feats, _, _ in sets)


def test_per_question_budgets_equal_selecting_each_question_alone(encoded):
    """The routed evaluation (rank once, budgets per question, one token set per distinct
    budget) keeps for every question exactly what `select` keeps for it alone."""
    (table, splits_), _, _ = encoded
    split = splits_["test"]
    projection = fit_projection(table.features, dims=8)
    generator = torch.Generator().manual_seed(0)
    texts = sorted({q.text for m in split.mosaics for q in m.questions})
    embeds = {t: torch.nn.functional.normalize(torch.randn(table.embeds.shape[1],
                                                           generator=generator), dim=0)
              for t in texts}
    method = MethodSpec("hero", "hero", (("artifact_layer", 2), ("object_layer", 1),
                                         ("saliency_weight", 0.0))).create(0)
    vocab = Vocabulary(texts, answer_vocabulary())
    routed = route_split(method, table, split, 0.111, QuestionTable.build(split, vocab, 16),
                         embeds, projection)
    asked = []
    for (mosaic, indices), (_, crop, pos) in zip(routed.groups, routed.token_sets, strict=True):
        crops = table.encoded(split.rows[mosaic])
        for j in indices:
            question = split.mosaics[mosaic].questions[j]
            alone = kept_tokens(method.select(crops, split.grids[mosaic], 0.111,
                                              embeds[question.text]),
                                crops.features, split.grids[mosaic], projection)
            assert torch.equal(alone[1], crop) and torch.equal(alone[2], pos)
            asked.append((mosaic, j))
    assert sorted(asked) == [(i, j) for i, m in enumerate(split.mosaics)
                             for j in range(len(m.questions))]
    assert len(routed.token_sets) > len(split.mosaics)  # the question does move budgets


def test_projection_learns_to_rank_the_asked_about_tile_first():
    """On synthetic pairs where each text is a fixed linear image of its tile's embedding,
    the contrastive projection recovers the map: retrieval far above chance (25 %)."""
    generator = torch.Generator().manual_seed(0)
    n, tiles, image_dim, text_dim = 600, 4, 16, 12
    embeds = torch.nn.functional.normalize(torch.randn(n, tiles, image_dim,
                                                       generator=generator), dim=-1)
    target = torch.randint(tiles, (n,), generator=generator)
    mix = torch.randn(text_dim, image_dim, generator=generator)
    texts = [f"q{i}" for i in range(n)]
    sentences = {t: mix @ embeds[i, target[i]] for i, t in enumerate(texts)}
    pairs = NamedPairs(texts, embeds, target, torch.arange(n))
    train, test = _split_pairs(pairs, 400)
    untrained = torch.zeros(image_dim, text_dim)
    assert retrieval_accuracy(test, sentences, untrained) < 0.5
    projection = train_projection(train, sentences, ProjectionConfig(steps=200))
    assert projection.shape == (image_dim, text_dim)
    assert retrieval_accuracy(test, sentences, projection) > 0.9


def _split_pairs(pairs, cut):
    def part(index):
        return NamedPairs([pairs.texts[i] for i in index.tolist()], pairs.tiles[index],
                          pairs.target[index], pairs.mosaic[index])
    order = torch.arange(len(pairs.texts))
    return part(order[:cut]), part(order[cut:])
