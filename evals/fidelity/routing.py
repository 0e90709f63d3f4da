"""Question-dependent selections: HERO with its relevance term, scored question by question.

With relevance on, HERO's tile budgets depend on the question, so one mosaic can keep a
different token set for each of its questions. Its ranking depends on the image alone,
so each mosaic's entry is made once (`hero_core.stages.rank_image`) and each question
selects from it (`select_tokens`), as the service serves a cached image; questions
that keep the same tokens share one token set, and the answer model reads each
distinct set once with all of its questions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from evals.fidelity.answer_model import AnswerModel
from evals.fidelity.data import NAMED_KINDS
from evals.fidelity.evaluation import (
    MethodSpec,
    QuestionTable,
    Result,
    SelectionStats,
    TokenSet,
    accuracy_by_kind,
    correct_answers,
    token_set,
)
from evals.fidelity.features import CropTable, EncodedSplit, TokenProjection
from hero_core.methods.base import RankedMethod
from hero_core.stages import Selected, entry_origin, prune_crops, rank_image, select_tokens


@dataclasses.dataclass
class RoutedSplit:
    """One split's token sets for a question-dependent method: a set per distinct budget."""

    token_sets: list[TokenSet]
    questions: QuestionTable
    """Rows follow `token_sets`: each row holds the questions that read that set."""
    groups: list[tuple[int, list[int]]]
    """Per token set: its mosaic and the indices of the questions that read it."""
    stats: SelectionStats
    target_tokens: list[tuple[int, float]]
    """Per named question: tokens on the tile holding its answer, and the mean over the
    mosaic's other tiles."""


def target_and_others(tiles: list[int], target: int) -> tuple[int, float]:
    """Tokens on the tile holding the answer, and the mean over the other tiles."""
    mine = tiles[target]
    return mine, (sum(tiles) - mine) / max(len(tiles) - 1, 1)


def mean_pair(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The mean of `(target, others)` pairs; (0, 0) without any."""
    mine, other = torch.tensor(pairs or [(0.0, 0.0)], dtype=torch.float64).mean(0).tolist()
    return mine, other


def group_rows(questions: QuestionTable, groups: list[tuple[int, list[int]]]) -> QuestionTable:
    """A question table whose row g holds the questions `groups[g] = (mosaic, [indices])`."""
    width = max(len(idx) for _, idx in groups)
    words = torch.zeros(len(groups), width, questions.words.shape[2], dtype=torch.long)
    answers = torch.full((len(groups), width), -100, dtype=torch.long)
    kinds = []
    for g, (mosaic, idx) in enumerate(groups):
        words[g, :len(idx)] = questions.words[mosaic, idx]
        answers[g, :len(idx)] = questions.answers[mosaic, idx]
        kinds.append([questions.kinds[mosaic][j] for j in idx])
    return QuestionTable(words, answers, kinds)


def route_split(method: RankedMethod, table: CropTable, split: EncodedSplit, ratio: float,
                questions: QuestionTable, embeds: dict[str, torch.Tensor],
                projection: TokenProjection) -> RoutedSplit:
    """Select per question (`embeds`: question text -> `(P,)` relevance embedding)."""
    sets: list[TokenSet] = []
    groups: list[tuple[int, list[int]]] = []
    stats, target_tokens = SelectionStats(), []
    for i, grid in enumerate(split.grids):
        entry = rank_image(table.encoded(split.rows[i]), grid, method,
                           entry_origin(method, ratio))
        by_budget: dict[tuple[int, ...], tuple[Selected, list[int]]] = {}
        for j, question in enumerate(split.mosaics[i].questions):
            selected = select_tokens(entry, method, ratio, embeds[question.text])
            budgets = tuple(selected.selection.counts)
            by_budget.setdefault(budgets, (selected, []))[1].append(j)
            if question.kind in NAMED_KINDS and question.target is not None:
                target_tokens.append(target_and_others(list(budgets[1:]), question.target))
        blank = [c.image is None for c in split.mosaics[i].cells]
        for selected, idx in by_budget.values():
            sets.append(token_set(selected.packed, grid, projection))
            groups.append((i, idx))
            stats.add(selected.selection, split.object_patches[i], blank)
    return RoutedSplit(sets, group_rows(questions, groups), groups, stats, target_tokens)


def evaluate_routed(spec: MethodSpec, ratio: float, models: dict[int, AnswerModel],
                    table: CropTable, split: EncodedSplit, questions: QuestionTable,
                    projection: TokenProjection, embeds: dict[str, torch.Tensor]) -> Result:
    """`evaluation.evaluate_spec` for a method whose selection follows the question.

    Its stats add `target_tile_tokens` and `other_tile_tokens`: the mean budget, over the
    named questions, of the tile holding the answer and of each other tile.
    """
    method = spec.create(0)
    if not isinstance(method, RankedMethod):
        raise TypeError(f"{spec.name} is not a ranked method; it cannot be routed per question")
    routed = route_split(method, table, split, ratio, questions, embeds, projection)
    scores = {seed: accuracy_by_kind(correct_answers(model, routed.token_sets, routed.questions),
                                     routed.questions)
              for seed, model in models.items()}
    stats = routed.stats.summary()
    stats["target_tile_tokens"], stats["other_tile_tokens"] = mean_pair(routed.target_tokens)
    stats["token_sets_per_mosaic"] = len(routed.token_sets) / max(len(split.mosaics), 1)
    return Result(spec.label, ratio, scores, stats)


def target_budgets(method: RankedMethod, table: CropTable, split: EncodedSplit,
                   ratio: float) -> tuple[float, float]:
    """A question-blind method's mean tokens, over the named questions, on the tile holding
    the answer and on each other tile."""
    pairs: list[tuple[float, float]] = []
    for i, grid in enumerate(split.grids):
        targets = [q.target for q in split.mosaics[i].questions
                   if q.kind in NAMED_KINDS and q.target is not None]
        if not targets:
            continue
        tiles = prune_crops(table.encoded(split.rows[i]), grid, method,
                            ratio).selection.counts[1:]
        pairs += [target_and_others(tiles, t) for t in targets]
    return mean_pair(pairs)
