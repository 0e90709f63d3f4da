"""The benchmark's task, built and encoded once: the run's settings (`RunConfig`), and
`prepare`, which builds the splits, encodes them (cache first) and sets up what the
answer model reads. Used by the benchmark (`run.py`) and by the relevance projection's
training (`relevance.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from evals.fidelity.answer_model import AnswerModelConfig, Vocabulary
from evals.fidelity.data import MosaicConfig, SplitSizes, answer_vocabulary, build_splits
from evals.fidelity.evaluation import QuestionTable
from evals.fidelity.features import (
    CropEncoder,
    CropStore,
    CropTable,
    EncodedSplit,
    FeatureSettings,
    TokenProjection,
    encode_splits,
    fit_projection,
)
from evals.fidelity.suite import TowerLayers
from hero_core.encoder import VisionEncoder
from hero_core.relevance import tower_fingerprint


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Sizes and settings of one benchmark run."""

    sizes: SplitSizes = dataclasses.field(default_factory=SplitSizes)
    mosaic: MosaicConfig = dataclasses.field(default_factory=MosaicConfig)
    model: AnswerModelConfig = dataclasses.field(default_factory=AnswerModelConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    """Answer-model training seeds; the random baseline uses the same seed."""
    ratios: tuple[float, ...] = (1.0, 0.222, 0.111, 0.056)
    sweep_ratio: float = 0.111
    projection_dims: int = 64
    """Principal components of the token features the answer model reads."""
    crop_size: int = 224
    feature_layer: int = -2
    data_seed: int = 0


QUICK = RunConfig(sizes=SplitSizes(80, 24, 48, 40, 16, 30),
                  model=AnswerModelConfig(epochs=4, batch_mosaics=16))


@dataclasses.dataclass
class Prepared:
    """The encoded task, ready for training and evaluation."""

    table: CropTable
    splits: dict[str, EncodedSplit]
    projection: TokenProjection
    projected: torch.Tensor
    """`(C, T, k)` projected features of every crop."""
    vocab: Vocabulary
    questions: dict[str, QuestionTable]
    new_crops: int


def random_tower(seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised DINOv2 (4 layers, width 64) for plumbing checks."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                          mlp_ratio=2, image_size=224, patch_size=14)
    tower: torch.nn.Module = Dinov2Model(config).eval()
    return tower


def prepare(config: RunConfig, encoder: VisionEncoder, cache_dir: Path) -> Prepared:
    """Build the splits, encode them (cache first) and set up the answer model's inputs."""
    from hero_core.dinov2 import dinov2_tiling

    layers = TowerLayers(encoder.num_layers)
    settings = FeatureSettings(tower_fingerprint(encoder.tower), dinov2_tiling(config.crop_size),
                               config.feature_layer, layers.late_layer)
    crop_encoder = CropEncoder(encoder, settings, CropStore(cache_dir / settings.compute_hash()))
    splits = build_splits(config.sizes, config.mosaic, config.data_seed)
    table, encoded = encode_splits(splits, config.mosaic, crop_encoder)
    train_rows = encoded["train"].rows.flatten().unique()
    projection = fit_projection(table.features[train_rows], config.projection_dims)
    vocab = Vocabulary([q.text for m in splits["train"] for q in m.questions],
                       answer_vocabulary())
    questions = {name: QuestionTable.build(split, vocab, config.model.max_words)
                 for name, split in encoded.items()}
    return Prepared(table, encoded, projection, projection(table.features), vocab, questions,
                    crop_encoder.encoded_count)
