"""Train the answer model (all tokens and subsets), then score it on what each method keeps.

A method sees one mosaic's `EncodedCrops` and `TileGrid` (from the crop table) through
the two stages the serving path runs (`hero_core.stages.prune_crops`: `rank_image`, the
part of stage 1 after the tower pass, then `select_tokens`), so what it keeps, with its
crop and position, is exactly what the service would send. VisionZip's merged
contextual tokens arrive with their merged features at their target's position.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from evals.fidelity.answer_model import (
    AnswerModel,
    AnswerModelConfig,
    TokenBatch,
    Vocabulary,
    pad_batch,
    predict,
)
from evals.fidelity.data import NAMED_KINDS
from evals.fidelity.features import CropTable, EncodedSplit, TokenProjection
from hero_core.encoder import EncodedCrops
from hero_core.methods import PruningMethod, create_method
from hero_core.packing import PackedTokens, Selection, pack_tokens
from hero_core.stages import prune_crops
from hero_core.tiling import TileGrid

TokenSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(features `(n, D)`, crop `(n,)` long, position in crop `(n,)` long) of kept tokens."""
KINDS = ("cell-open", "cell-yesno", "exists", "count", *NAMED_KINDS)


@dataclasses.dataclass
class QuestionTable:
    """The questions of one split as padded tensors, one row per mosaic."""

    words: torch.Tensor
    """`(M, Q, max_words)` long word ids (Q = most questions of any mosaic)."""
    answers: torch.Tensor
    """`(M, Q)` long answer ids, -100 where a mosaic has fewer questions."""
    kinds: list[list[str]]

    @classmethod
    def build(cls, split: EncodedSplit, vocab: Vocabulary, max_words: int) -> QuestionTable:
        q = max(len(m.questions) for m in split.mosaics)
        words = torch.zeros(len(split.mosaics), q, max_words, dtype=torch.long)
        answers = torch.full((len(split.mosaics), q), -100, dtype=torch.long)
        for i, mosaic in enumerate(split.mosaics):
            for j, question in enumerate(mosaic.questions):
                words[i, j] = torch.tensor(vocab.encode(question.text, max_words))
                answers[i, j] = vocab.answers[question.answer]
        return cls(words, answers, [[q.kind for q in m.questions] for m in split.mosaics])


def token_set(packed: PackedTokens, grid: TileGrid, projection: TokenProjection) -> TokenSet:
    """Packed kept tokens as the answer model reads them, projected."""
    position = packed.row.long() * grid.side + packed.col.long()
    return projection(packed.features), packed.crop.long(), position


def kept_tokens(selection: Selection, features: torch.Tensor, grid: TileGrid,
                projection: TokenProjection) -> TokenSet:
    """The kept tokens of a selection made outside the stages (a reference to check
    them against), packed as the serving path packs them, projected."""
    return token_set(pack_tokens(selection, features, grid), grid, projection)


def training_batches(projected: torch.Tensor, attention: torch.Tensor, split: EncodedSplit,
                     questions: QuestionTable, config: AnswerModelConfig,
                     seed: int) -> Iterator[TokenBatch]:
    """Endless shuffled training batches of mosaics.

    projected: `(C, T, k)` projected crop table; attention: `(C, L, T)` CLS attention.
    Each batch holds every token (`full_batch_share` of the batches), or per mosaic a
    subset of a size drawn log-uniformly from [`min_keep_ratio`, 1]: its top tokens by
    the CLS attention of a random layer (`focused_batch_share`), else uniformly random
    tokens. The model thus learns to answer from any kind of kept set, concentrated on
    attended tokens or spread out, without seeing any one method's selections.
    """
    generator = torch.Generator().manual_seed(seed)
    b, crops, tokens = config.batch_mosaics, split.rows.shape[1], projected.shape[1]
    crop = torch.arange(crops).repeat_interleave(tokens).expand(b, -1)
    position = torch.arange(tokens).repeat(crops).expand(b, -1)
    while True:
        order = torch.randperm(len(split.mosaics), generator=generator)
        for start in range(0, len(order) - b + 1, b):
            rows = split.rows[order[start:start + b]]
            features = projected[rows].flatten(1, 2)
            chosen = choose_tokens(attention[rows], config, generator)
            wide = chosen[..., None].expand(-1, -1, features.shape[2])
            yield TokenBatch(features.gather(1, wide), crop.gather(1, chosen),
                             position.gather(1, chosen), torch.ones_like(chosen, dtype=torch.bool),
                             questions.words[order[start:start + b]],
                             questions.answers[order[start:start + b]])


def choose_tokens(attention: torch.Tensor, config: AnswerModelConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Token indices `(B, n)` into each mosaic's `K+1` crops x `T` tokens for one training
    batch; attention: `(B, K+1, L, T)`."""
    b, crops, layers, tokens = attention.shape
    total = crops * tokens
    draw = float(torch.rand((), generator=generator))
    if draw < config.full_batch_share:
        return torch.arange(total).expand(b, -1)
    low = math.log(config.min_keep_ratio)
    keep = max(1, round(math.exp(low * float(torch.rand((), generator=generator))) * total))
    if draw < config.full_batch_share + config.focused_batch_share:
        layer = int(torch.randint(layers, (), generator=generator))
        scores = attention[:, :, layer].flatten(1)
    else:
        scores = torch.rand(b, total, generator=generator)
    return scores.topk(keep, 1).indices


def new_model(feature_dim: int, grid: TileGrid, vocab: Vocabulary,
              config: AnswerModelConfig, seed: int) -> AnswerModel:
    """A freshly initialised answer model (seeded)."""
    torch.manual_seed(seed)
    return AnswerModel(feature_dim, grid.num_crops, grid.tokens_per_crop,
                       vocab.num_words, len(vocab.answers), config)


def correct_answers(model: AnswerModel, token_sets: Sequence[TokenSet],
                    questions: QuestionTable, batch_mosaics: int = 64) -> torch.Tensor:
    """`(questions,)` bool: which questions of the split the model answers right."""
    out = []
    for start in range(0, len(token_sets), batch_mosaics):
        idx = list(range(start, min(start + batch_mosaics, len(token_sets))))
        batch = pad_batch([token_sets[i] for i in idx], questions.words[idx],
                          questions.answers[idx])
        hits = predict(model, batch) == batch.answers
        out.append(hits[batch.answers != -100])
    return torch.cat(out)


def accuracy_by_kind(correct: torch.Tensor, questions: QuestionTable) -> dict[str, float]:
    """Accuracy over all questions (`all`) and per question kind."""
    kinds = [k for row in questions.kinds for k in row]
    out = {"all": float(correct.float().mean())}
    for kind in KINDS:
        mask = torch.tensor([k == kind for k in kinds])
        if bool(mask.any()):
            out[kind] = float(correct[mask].float().mean())
    return out


def prior_accuracy(train: QuestionTable, test: QuestionTable) -> float:
    """Accuracy of answering each question text with its most frequent training answer
    (the question-only floor: no image at all)."""
    counts: dict[tuple[int, ...], Counter[int]] = {}
    for words, answer in _pairs(train):
        counts.setdefault(words, Counter())[answer] += 1
    overall = sum(counts.values(), Counter())
    hits = total = 0
    for words, answer in _pairs(test):
        guess = (counts.get(words) or overall).most_common(1)[0][0]
        hits, total = hits + int(guess == answer), total + 1
    return hits / max(total, 1)


def _pairs(questions: QuestionTable) -> Iterator[tuple[tuple[int, ...], int]]:
    valid = questions.answers != -100
    for words, answer in zip(questions.words[valid].tolist(), questions.answers[valid].tolist(),
                             strict=True):
        yield tuple(words), answer


@dataclasses.dataclass(frozen=True)
class CropSubsetConfig:
    """Which crops keep all their tokens."""

    crops: tuple[int, ...] = (0,)
    """Crop indices (0 = thumbnail, 1..K = tiles)."""


class CropSubset(PruningMethod):
    """Reference point, not a pruning method: whole crops kept, the rest dropped, whatever
    the ratio (thumbnail only = what the tiles add; tiles only = what the thumbnail adds)."""

    name = "crop-subset"
    Config = CropSubsetConfig
    config: CropSubsetConfig

    def select(self, crops: EncodedCrops, grid: TileGrid, ratio: float,
               question: torch.Tensor | None) -> Selection:
        every = torch.arange(grid.tokens_per_crop)
        return Selection([every if i in self.config.crops else every[:0]
                          for i in range(grid.num_crops)])


REFERENCE_METHODS: dict[str, type[PruningMethod]] = {CropSubset.name: CropSubset}
"""Reference selections evaluated beside the registry's methods."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of a results table: a registry method with setting overrides."""

    label: str
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    seeded: bool = False
    """The method draws random numbers: its `seed` setting follows the run's seed."""

    def create(self, seed: int) -> PruningMethod:
        settings = {**dict(self.overrides), **({"seed": seed} if self.seeded else {})}
        reference = REFERENCE_METHODS.get(self.name)
        if reference is not None:
            return reference(reference.Config(**settings))
        return create_method(self.name, **settings)


@dataclasses.dataclass
class SelectionStats:
    """What a method kept, summed over a split (for the diagnostics table)."""

    tokens: float = 0.0
    tile_object_kept: float = 0.0
    tile_object_total: float = 0.0
    thumb_object_kept: float = 0.0
    thumb_object_total: float = 0.0
    blank_tile_tokens: float = 0.0
    blank_tiles: int = 0
    shape_tile_tokens: float = 0.0
    shape_tiles: int = 0
    fewest_on_shape_tile: float = 0.0
    mosaics_with_shapes: int = 0
    mosaics: int = 0
    kept: list[int] = dataclasses.field(default_factory=list)
    """Per mosaic, a digest of the kept (crop, token) set: equal digests, equal sets."""

    def add(self, selection: Selection, objects: torch.Tensor, blank: Sequence[bool]) -> None:
        """objects: `(K+1, T)` bool object patches; blank: per tile, whether it is empty."""
        self.mosaics += 1
        self.tokens += selection.total
        self.kept.append(selection_digest(selection, objects.shape[1]))
        on_shapes = [int(index.numel()) for crop, index in enumerate(selection.indices)
                     if crop > 0 and not blank[crop - 1]]
        if on_shapes:
            self.fewest_on_shape_tile += min(on_shapes)
            self.mosaics_with_shapes += 1
        for crop, index in enumerate(selection.indices):
            hit = float(objects[crop, index.long()].sum())
            if crop == 0:
                self.thumb_object_kept += hit
                self.thumb_object_total += float(objects[0].sum())
                continue
            self.tile_object_kept += hit
            self.tile_object_total += float(objects[crop].sum())
            if blank[crop - 1]:
                self.blank_tile_tokens, self.blank_tiles = (
                    self.blank_tile_tokens + index.numel(), self.blank_tiles + 1)
            else:
                self.shape_tile_tokens, self.shape_tiles = (
                    self.shape_tile_tokens + index.numel(), self.shape_tiles + 1)

    def summary(self) -> dict[str, float]:
        return {
            "tokens": self.tokens / max(self.mosaics, 1),
            "tile_object_recall": self.tile_object_kept / max(self.tile_object_total, 1.0),
            "thumb_object_recall": self.thumb_object_kept / max(self.thumb_object_total, 1.0),
            "tokens_per_blank_tile": self.blank_tile_tokens / max(self.blank_tiles, 1),
            "tokens_per_shape_tile": self.shape_tile_tokens / max(self.shape_tiles, 1),
            "fewest_on_shape_tile": self.fewest_on_shape_tile / max(self.mosaics_with_shapes, 1),
        }


def selection_digest(selection: Selection, tokens_per_crop: int) -> int:
    """A fingerprint of the kept (crop, token) set, whatever the order."""
    flat = torch.cat([crop * tokens_per_crop + index.long().cpu()
                      for crop, index in enumerate(selection.indices)])
    return hash(tuple(torch.sort(flat).values.tolist()))


def select_split(method: PruningMethod, table: CropTable, split: EncodedSplit, ratio: float,
                 projection: TokenProjection) -> tuple[list[TokenSet], SelectionStats]:
    """Run `method` at `ratio` on every mosaic of a split (no question: relevance off)."""
    sets, stats = [], SelectionStats()
    for i, grid in enumerate(split.grids):
        selected = prune_crops(table.encoded(split.rows[i]), grid, method, ratio)
        sets.append(token_set(selected.packed, grid, projection))
        blank = [c.image is None for c in split.mosaics[i].cells]
        stats.add(selected.selection, split.object_patches[i], blank)
    return sets, stats


@dataclasses.dataclass
class Result:
    """Accuracy of one method setting at one ratio, per seed, with what it kept."""

    label: str
    ratio: float
    accuracy: dict[int, dict[str, float]]
    """seed -> question kind (and `all`) -> accuracy in [0, 1]."""
    stats: dict[str, float]
    """`SelectionStats.summary()` (the same for every seed unless the method is seeded)."""
    kept: list[int] = dataclasses.field(default_factory=list)
    """`SelectionStats.kept` of the last seed: which mosaics keep the same set as another."""

    def same_selection(self, other: Result) -> float:
        """Share of mosaics on which this and `other` keep exactly the same tokens."""
        pairs = list(zip(self.kept, other.kept, strict=True))
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)

    def values(self, kind: str = "all") -> torch.Tensor:
        """Accuracies `(seeds,)` in seed order."""
        return torch.tensor([self.accuracy[s][kind] for s in sorted(self.accuracy)],
                            dtype=torch.float64)

    def mean(self, kind: str = "all") -> float:
        return float(self.values(kind).mean())

    def std(self, kind: str = "all") -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        values = self.values(kind)
        return float(values.std()) if values.numel() > 1 else 0.0


def evaluate_spec(spec: MethodSpec, ratio: float, models: dict[int, AnswerModel],
                  table: CropTable, split: EncodedSplit, questions: QuestionTable,
                  projection: TokenProjection) -> Result:
    """Accuracy per seed (by question kind) and selection statistics of one method."""
    shared: tuple[list[TokenSet], SelectionStats] | None = None
    scores = {}
    for seed, model in models.items():
        if spec.seeded or shared is None:
            shared = select_split(spec.create(seed), table, split, ratio, projection)
        scores[seed] = accuracy_by_kind(correct_answers(model, shared[0], questions), questions)
    assert shared is not None
    return Result(spec.label, ratio, scores, shared[1].summary(), shared[1].kept)


def paired(a: Result, b: Result) -> tuple[float, float]:
    """Mean and std over seeds of `a - b`, in points."""
    diff = (a.values() - b.values()) * 100
    return float(diff.mean()), float(diff.std()) if diff.numel() > 1 else 0.0


def verdict(a: Result, b: Result, floor: float = 0.5) -> str:
    """`ahead`, `behind` or `level`: ahead/behind only when the paired difference exceeds
    both twice its seed std and `floor` points."""
    mean, std = paired(a, b)
    if abs(mean) <= max(2 * std, floor):
        return "level"
    return "ahead" if mean > 0 else "behind"
