"""Encode every crop of every mosaic once, through the real tiling and encoder, and cache it.

A mosaic is cut by `hero_core.tiling.tile_image` (thumbnail + 4 tiles) and each crop
goes through `hero_core.encoder.VisionEncoder` once, recording the features of all
tokens, the CLS attention row of every layer (so any L_obj / L_art can be evaluated
later without re-encoding), the patch keys of one layer (for VisionZip) and the
pooled embedding. Entries are stored per crop under
`<cache>/<settings hash>/<crop pixel hash>.pt`: a cell reused by several mosaics is
the same tile, bit for bit, and is encoded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from evals.fidelity.data import Mosaic, MosaicConfig, object_mask, render_cell, render_mosaic
from hero_core.config import compute_config_hash
from hero_core.encoder import EncodedCrops, VisionEncoder
from hero_core.tiling import TileGrid, TilingSpec, tile_image

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "hero-serve" / "fidelity"


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Everything besides the pixels that changes a cached crop entry."""

    weights: str
    """Fingerprint of the tower's weights (`hero_core.relevance.tower_fingerprint`)."""
    tiling: TilingSpec
    feature_layer: int = -2
    """Which hidden state the features are (LLaVA's convention: the penultimate)."""
    key_layer: int = 10
    """Layer whose patch keys are kept (VisionZip merges by them)."""
    format_version: int = 1

    def compute_hash(self) -> str:
        return compute_config_hash(self)


def crop_key(pixels: torch.Tensor) -> str:
    """Content id of one normalised crop `(3, H, W)` float32."""
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()[:32]


class CropStore:
    """Per-crop entries (dicts of tensors) in one folder; a failed read is a miss."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        try:
            entry: dict[str, torch.Tensor] = torch.load(self.path(key), weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None
        return entry

    def save(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        torch.save(entry, tmp)
        tmp.replace(self.path(key))


def encode_batch(encoder: VisionEncoder, pixels: torch.Tensor,
                 key_layer: int) -> list[dict[str, torch.Tensor]]:
    """Cache entries of crops `(N, 3, H, W)`: `features` `(T, D)` fp16, `attention`
    `(L, T)` fp32 (every layer), `keys` `(T, D)` fp16 (`key_layer`), `embed` `(P,)` fp32."""
    layers = range(encoder.num_layers)
    out = encoder.encode(pixels, attention_layers=layers, key_layers=(key_layer,))
    attention = torch.stack([out.attention[layer] for layer in layers], 1).float().cpu()
    return [{"features": out.features[i].half().cpu(), "attention": attention[i],
             "keys": out.keys[key_layer][i].half().cpu(), "embed": out.image_embeds[i].cpu()}
            for i in range(pixels.shape[0])]


@dataclasses.dataclass
class CropTable:
    """All distinct crops of a run, stacked; mosaics refer to rows."""

    features: torch.Tensor
    """`(C, T, D)` fp16 features of every token."""
    attention: torch.Tensor
    """`(C, L, T)` fp32 CLS attention rows of every layer."""
    keys: torch.Tensor
    """`(C, T, D)` fp16 patch keys at `key_layer`."""
    embeds: torch.Tensor
    """`(C, P)` fp32 L2-normalised pooled embeddings."""
    key_layer: int

    def encoded(self, rows: torch.Tensor) -> EncodedCrops:
        """The `EncodedCrops` of one mosaic's crops `rows` `(K+1,)`, thumbnail first."""
        attention = self.attention[rows]
        return EncodedCrops(
            features=self.features[rows].float(),
            attention={layer: attention[:, layer] for layer in range(attention.shape[1])},
            keys={self.key_layer: self.keys[rows].float()},
            image_embeds=self.embeds[rows],
        )


@dataclasses.dataclass
class EncodedSplit:
    """The mosaics of one split as rows of the crop table, with their geometry."""

    mosaics: list[Mosaic]
    rows: torch.Tensor
    """`(M, K+1)` long: crop-table row of each mosaic's crops."""
    grids: list[TileGrid]
    object_patches: torch.Tensor
    """`(M, K+1, T)` bool: patches that show part of a shape (for diagnostics)."""


class CropEncoder:
    """Tiles mosaics, encodes crops not seen before (cache, then tower) and collects rows."""

    def __init__(self, encoder: VisionEncoder, settings: FeatureSettings, store: CropStore,
                 batch_size: int = 16):
        self.encoder, self.settings, self.store = encoder, settings, store
        self.batch_size = batch_size
        self.index: dict[str, int] = {}
        self.entries: list[dict[str, torch.Tensor]] = []
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.encoded_count = 0

    def add(self, pixels: torch.Tensor) -> list[str]:
        """Queue crops `(K+1, 3, H, W)`; returns their keys."""
        keys = [crop_key(p) for p in pixels]
        for key, crop in zip(keys, pixels, strict=True):
            if key in self.index or any(key == k for k, _ in self.pending):
                continue
            entry = self.store.load(key)
            if entry is None:
                self.pending.append((key, crop))
            else:
                self._keep(key, entry)
        if len(self.pending) >= self.batch_size:
            self.flush()
        return keys

    def flush(self) -> None:
        """Encode the queued crops and store them."""
        if not self.pending:
            return
        batch = torch.stack([p for _, p in self.pending])
        for (key, _), entry in zip(self.pending, encode_batch(
                self.encoder, batch, self.settings.key_layer), strict=True):
            self.store.save(key, entry)
            self._keep(key, entry)
        self.encoded_count += len(self.pending)
        self.pending = []

    def _keep(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        self.index[key] = len(self.entries)
        self.entries.append(entry)

    def table(self) -> CropTable:
        """Every crop seen so far, stacked in row order."""
        self.flush()
        stacked = {name: torch.stack([e[name] for e in self.entries])
                   for name in ("features", "attention", "keys", "embed")}
        return CropTable(stacked["features"], stacked["attention"], stacked["keys"],
                         stacked["embed"], self.settings.key_layer)


def patch_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Any-pooling of a pixel mask `(S, S)` into `side x side` patches, flattened."""
    pooled = nn.functional.adaptive_max_pool2d(mask[None, None].float(), side)
    return pooled.flatten().bool()


def object_patches(mosaic: Mosaic, config: MosaicConfig, side: int) -> torch.Tensor:
    """`(5, side*side)` bool: thumbnail then tile patches that cover part of a shape."""
    cells = [torch.from_numpy(object_mask(render_cell(c, config), c.background))
             for c in mosaic.cells]
    whole = torch.cat([torch.cat(cells[r:r + 2], 1) for r in (0, 2)], 0)
    return torch.stack([patch_mask(whole, side), *(patch_mask(c, side) for c in cells)])


def encode_splits(splits: dict[str, list[Mosaic]], config: MosaicConfig,
                  crop_encoder: CropEncoder, log_every: int = 200,
                  ) -> tuple[CropTable, dict[str, EncodedSplit]]:
    """Encode every mosaic of every split (cache first); see `EncodedSplit`."""
    spec = crop_encoder.settings.tiling
    keyed: dict[str, tuple[list[list[str]], list[TileGrid], list[torch.Tensor]]] = {}
    start, done = time.perf_counter(), 0
    for name, mosaics in splits.items():
        keys, grids, masks = [], [], []
        for mosaic in mosaics:
            pixels, grid = tile_image(render_mosaic(mosaic, config), spec)
            keys.append(crop_encoder.add(pixels))
            grids.append(grid)
            masks.append(object_patches(mosaic, config, spec.side))
            done += 1
            if done % log_every == 0:
                print(f"  encoded {done} mosaics ({crop_encoder.encoded_count} new crops) in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        keyed[name] = (keys, grids, masks)
    table = crop_encoder.table()
    out = {name: EncodedSplit(splits[name], _rows(keys, crop_encoder.index), grids,
                              torch.stack(masks))
           for name, (keys, grids, masks) in keyed.items()}
    return table, out


def _rows(keys: Sequence[Sequence[str]], index: dict[str, int]) -> torch.Tensor:
    return torch.tensor([[index[k] for k in mosaic] for mosaic in keys], dtype=torch.long)


@dataclasses.dataclass
class TokenProjection:
    """A fixed linear map of token features onto their top principal components.

    Linear, so it commutes with averaging (VisionZip's merged tokens project to the
    mean of their members' projections); it only makes the answer model cheaper.
    """

    mean: torch.Tensor
    """`(D,)` feature mean of the training tokens."""
    basis: torch.Tensor
    """`(D, k)` top-k principal directions, scaled so projections have unit mean variance."""
    explained: float
    """Share of the feature variance the k directions keep."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """`(..., D)` -> `(..., k)` float32."""
        return (features.float() - self.mean) @ self.basis


def fit_projection(features: torch.Tensor, dims: int, sample: int = 100_000,
                   seed: int = 0) -> TokenProjection:
    """PCA of token features `(C, T, D)` on a random sample of `sample` tokens."""
    flat = features.reshape(-1, features.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    chosen = flat[torch.randperm(flat.shape[0], generator=generator)[:sample]].double()
    mean = chosen.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((chosen - mean).T))
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    scale = values[:dims].mean().sqrt().clamp_min(1e-12)
    return TokenProjection(mean.float(), (vectors[:, :dims] / scale).float(),
                           float(values[:dims].sum() / values.sum()))
