"""Learn the question encoder's projection for a tower without a text tower, and test it.

The sentence encoder (all-MiniLM-L6-v2) stays frozen; only a linear map from its
384-d sentence space into the tower's image-embedding space is learned, as CLIP's
text projection is: contrastively, each named question (it names a shape held by one
cell) against the four tiles of its mosaic, the tile holding the answer being the
positive. Training pairs come from the training mosaics only; retrieval accuracy
(question -> right tile, top-1 of 4) is measured on validation and test mosaics.

    python -m evals.fidelity.relevance --write   # regenerate hero_core's shipped projection
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from evals.fidelity.data import NAMED_KINDS
from evals.fidelity.features import DEFAULT_CACHE_DIR, CropTable, EncodedSplit
from evals.fidelity.prepare import RunConfig, prepare
from hero_core.config import require
from hero_core.dinov2 import load_dinov2
from hero_core.encoder import VisionEncoder
from hero_core.relevance import (
    DINOV2_RELEVANCE_PATH,
    SentenceEncoder,
    project,
    read_projection,
    save_projection,
    tower_fingerprint,
)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """How the projection is learned; every field changes the weights."""

    steps: int = 400
    """Full-batch AdamW steps."""
    learning_rate: float = 0.01
    weight_decay: float = 0.01
    logit_scale: float = 20.0
    """Inverse temperature of the 4-way softmax over a mosaic's tiles."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.steps > 0 and self.learning_rate > 0, "steps and learning_rate must be > 0")


@dataclasses.dataclass
class NamedPairs:
    """Named questions of one split with the tiles they are asked about."""

    texts: list[str]
    tiles: torch.Tensor
    """`(N, K, P)` L2-normalised image embeddings of the question's mosaic's tiles."""
    target: torch.Tensor
    """`(N,)` long: index of the tile holding the answer."""
    mosaic: torch.Tensor
    """`(N,)` long: the mosaic each question belongs to."""


def named_pairs(table: CropTable, split: EncodedSplit) -> NamedPairs:
    """Every named question of a split (kinds `NAMED_KINDS`) with its mosaic's tiles."""
    texts, rows, target, mosaic = [], [], [], []
    for i, m in enumerate(split.mosaics):
        for q in m.questions:
            if q.kind in NAMED_KINDS and q.target is not None:
                texts.append(q.text)
                rows.append(split.rows[i, 1:])
                target.append(q.target)
                mosaic.append(i)
    tiles = table.embeds[torch.stack(rows)] if rows else torch.zeros(0, 4, table.embeds.shape[1])
    return NamedPairs(texts, tiles.float(), torch.tensor(target, dtype=torch.long),
                      torch.tensor(mosaic, dtype=torch.long))


def sentence_table(sentence: SentenceEncoder, texts: Sequence[str],
                   batch: int = 64) -> dict[str, torch.Tensor]:
    """Sentence embedding `(S,)` of every distinct text."""
    distinct = sorted(set(texts))
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(distinct), batch):
        chunk = distinct[start:start + batch]
        out.update(zip(chunk, sentence.embed_many(chunk), strict=True))
    return out


def train_projection(pairs: NamedPairs, sentences: dict[str, torch.Tensor],
                     config: ProjectionConfig) -> torch.Tensor:
    """The projection `(P, S)` that ranks each question's own tile first (cross-entropy over
    its mosaic's tiles), rounded to fp16 as it ships."""
    generator = torch.Generator().manual_seed(config.seed)
    text = torch.stack([sentences[t] for t in pairs.texts])
    dims = (pairs.tiles.shape[-1], text.shape[-1])
    weight = (torch.randn(dims, generator=generator) / dims[1] ** 0.5).requires_grad_()
    optimizer = torch.optim.AdamW([weight], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    for _ in range(config.steps):
        logits = config.logit_scale * torch.einsum("nkp,np->nk", pairs.tiles,
                                                   project(text, weight))
        loss = torch.nn.functional.cross_entropy(logits, pairs.target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach().half().float()


def tile_scores(pairs: NamedPairs, sentences: dict[str, torch.Tensor],
                projection: torch.Tensor) -> torch.Tensor:
    """`(N, K)` tile . question for every pair."""
    text = project(torch.stack([sentences[t] for t in pairs.texts]), projection)
    return torch.einsum("nkp,np->nk", pairs.tiles, text)


def retrieval_accuracy(pairs: NamedPairs, sentences: dict[str, torch.Tensor],
                       projection: torch.Tensor) -> float:
    """Share of named questions whose own tile scores highest of the mosaic's tiles."""
    if not pairs.texts:
        return float("nan")
    hits = tile_scores(pairs, sentences, projection).argmax(1) == pairs.target
    return float(hits.float().mean())


@dataclasses.dataclass
class RelevanceFit:
    """The learned projection and how well it retrieves the asked-about tile."""

    projection: torch.Tensor
    retrieval: dict[str, float]
    """split -> top-1 retrieval accuracy of the named questions."""
    pairs: dict[str, int]
    """split -> number of named questions."""
    shipped_difference: float | None
    """Largest absolute difference to the projection hero_core ships (None: none shipped)."""


def fit_relevance(table: CropTable, splits: dict[str, EncodedSplit], sentence: SentenceEncoder,
                  config: ProjectionConfig = ProjectionConfig()) -> RelevanceFit:
    """Learn the projection on the training split, measure retrieval on every split."""
    pairs = {name: named_pairs(table, split) for name, split in splits.items()}
    sentences = sentence_table(sentence, [t for p in pairs.values() for t in p.texts])
    projection = train_projection(pairs["train"], sentences, config)
    shipped = None
    if DINOV2_RELEVANCE_PATH.is_file():
        saved, _ = read_projection(DINOV2_RELEVANCE_PATH)
        shipped = (float((saved - projection).abs().max()) if saved.shape == projection.shape
                   else float("inf"))
    return RelevanceFit(projection,
                        {n: retrieval_accuracy(p, sentences, projection) for n, p in pairs.items()},
                        {n: len(p.texts) for n, p in pairs.items()}, shipped)


def main(argv: Sequence[str] | None = None) -> None:
    """Encode the benchmark's mosaics (cache first), learn the projection, report it and,
    with `--write`, store it where hero_core loads it from."""
    parser = argparse.ArgumentParser(prog="python -m evals.fidelity.relevance")
    parser.add_argument("--write", action="store_true",
                        help=f"write the projection to {DINOV2_RELEVANCE_PATH}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoder = VisionEncoder(load_dinov2(), feature_layer=RunConfig().feature_layer)
    data = prepare(RunConfig(), encoder, DEFAULT_CACHE_DIR)
    fit = fit_relevance(data.table, data.splits, SentenceEncoder.load())
    print({"retrieval": fit.retrieval, "pairs": fit.pairs,
           "shipped_difference": fit.shipped_difference}, file=sys.stderr)
    if args.write:
        save_projection(DINOV2_RELEVANCE_PATH, fit.projection, encoder.kind,
                        tower_fingerprint(encoder.tower),
                        made_by="python -m evals.fidelity.relevance --write",
                        retrieval_test=f"{fit.retrieval['test']:.4f}")


if __name__ == "__main__":
    main()
