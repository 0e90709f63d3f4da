"""Where a CLS-token ViT's attention changes stage, and which layers HERO should read.

HERO reads the CLS attention at two depths: `L_obj`, in the *object stage* where it
spreads over foreground objects, and `L_art`, in the *artifact stage* where it
collapses onto a few high-norm, register-like background tokens. The layers differ
per tower, so they are measured here, one tower pass per batch of images:

* `entropy[l]`: entropy (nats) of the CLS row at layer l, heads summed, normalised
  over the patch tokens; between 0 and log T.
* `artifact_share[l]`: the share of that row on *high-norm* tokens, whose output
  hidden-state norm at layer l exceeds mean + k * std over the image's patch tokens.
* `topk_overlap[l]`: |top-k(l) n top-k(ref)| / k, ref = the mean row of the last
  `reference_layers` layers.

`suggest_layers` applies `SPLIT_RULE` to these curves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from hero_core.config import CalibrationConfig, require
from hero_core.encoder import VisionEncoder
from hero_core.image import to_rgb
from hero_core.tiling import TilingSpec, normalize_crops

"""scikit-image's bundled photos (no download) used when no images are given."""
SPEC_DEPTH = (11 / 24, 22 / 24)
"""The method spec's defaults L_obj = 11, L_art = 22 of CLIP-L's 24 layers, as depths."""
SPLIT_RULE = (
    "split = first layer l >= 1 whose artifact share >= share_min; L_obj = split - 1 "
    "(the deepest object-stage layer); L_art = the layer >= split with the largest "
    "artifact share (earliest on ties). Without a split, no artifact stage exists and "
    "L_obj, L_art keep the spec's depths round(L*11/24), round(L*22/24)")
"""The rule `suggest_layers` applies, printed with every suggestion."""


@dataclasses.dataclass(frozen=True)
class LayerCurves:
    """Per-layer means over the images; every array is `(L,)`."""

    entropy: np.ndarray
    artifact_share: np.ndarray
    topk_overlap: np.ndarray
    high_norm_tokens: np.ndarray
    """Mean number of high-norm tokens per image."""
    num_tokens: int
    """T, patch tokens per image (entropy is at most log T)."""
    num_images: int

    @property
    def num_layers(self) -> int:
        return len(self.entropy)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """Suggested HERO layers and the stage split they come from."""

    object_layer: int
    artifact_layer: int
    split_layer: int | None
    """First artifact-stage layer, or None when no layer reaches `share_min`."""
    rule: str = SPLIT_RULE


def prepare_images(images: Sequence[Image.Image], tiling: TilingSpec) -> torch.Tensor:
    """Images squashed to the crop size like a thumbnail and normalised:
    `(N, 3, crop, crop)` float32."""
    side = tiling.crop_size
    resample = Image.Resampling(tiling.resample)
    crops = [np.asarray(to_rgb(im).resize((side, side), resample=resample))
             for im in images]
    return normalize_crops(np.stack(crops), tiling)


@contextmanager
def _block_norms(blocks: nn.ModuleList) -> Iterator[dict[int, torch.Tensor]]:
    """Records, per block, the patch tokens' output hidden-state norms `(N, T)`."""
    norms: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Any:
        def keep(_m: nn.Module, _i: Any, out: Any) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            norms[layer] = hidden[:, 1:].float().norm(dim=-1)
        return keep

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions `(..., T)` along the last axis."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def topk_overlap(rows: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(rows) n top-k(reference)| / k: rows `(N, L, T)`, reference `(N, T)` -> `(N, L)`."""
    k = min(k, rows.shape[-1])
    ref = torch.zeros_like(reference, dtype=torch.bool).scatter_(
        -1, reference.topk(k, dim=-1).indices, True)
    top = rows.topk(k, dim=-1).indices
    return ref[:, None, :].expand(-1, rows.shape[1], -1).gather(-1, top).double().mean(-1)


def batch_stats(encoder: VisionEncoder, pixels: torch.Tensor,
                config: CalibrationConfig) -> dict[str, torch.Tensor]:
    """Per-image, per-layer statistics `(N, L)` of one batch `(N, 3, H, W)` (one pass);
    `num_tokens` `(N,)` is T, the patch tokens per image."""
    layers = range(encoder.num_layers)
    with _block_norms(encoder.layers) as norms:
        encoded = encoder.encode(pixels, attention_layers=layers)
    rows = torch.stack([encoded.attention[i] for i in layers], 1).double()  # (N, L, T)
    p = rows / rows.sum(-1, keepdim=True)
    norm = torch.stack([norms[i] for i in layers], 1).double()
    limit = norm.mean(-1, keepdim=True) + config.norm_std_factor * norm.std(-1, keepdim=True)
    high = norm > limit
    reference = p[:, -config.reference_layers:].mean(1)
    return {"entropy": entropy(p), "artifact_share": (p * high).sum(-1),
            "topk_overlap": topk_overlap(p, reference, config.top_k),
            "high_norm_tokens": high.double().sum(-1),
            "num_tokens": torch.full((len(p),), float(p.shape[-1]), dtype=torch.float64)}


def measure(encoder: VisionEncoder, pixels: torch.Tensor,
            config: CalibrationConfig = CalibrationConfig()) -> LayerCurves:
    """Curves over images `(N, 3, H, W)`, in batches of `config.batch_size`."""
    require(len(pixels) > 0, "calibration needs at least one image")
    parts = [batch_stats(encoder, pixels[i:i + config.batch_size], config)
             for i in range(0, len(pixels), config.batch_size)]
    mean = {key: torch.cat([p[key] for p in parts]).mean(0).numpy() for key in parts[0]}
    return LayerCurves(mean["entropy"], mean["artifact_share"], mean["topk_overlap"],
                       mean["high_norm_tokens"], int(mean["num_tokens"]), len(pixels))


def suggest_layers(curves: LayerCurves, share_min: float = 0.5) -> Suggestion:
    """Apply `SPLIT_RULE` to `curves`."""
    n, share = curves.num_layers, curves.artifact_share
    split = next((layer for layer in range(1, n) if share[layer] >= share_min), None)
    if split is None:
        obj, art = (min(n - 1, round(n * depth)) for depth in SPEC_DEPTH)
        return Suggestion(obj, art, None)
    art = split + int(np.argmax(share[split:]))
    return Suggestion(split - 1, art, split)


def describe(suggestion: Suggestion, curves: LayerCurves, share_min: float) -> str:
    """One paragraph: where the stages split and why these layers."""
    s = suggestion
    if s.split_layer is None:
        return (f"no artifact stage: no layer puts >= {share_min:g} of its CLS attention on "
                f"high-norm tokens (max {curves.artifact_share.max():.3f}); suggested "
                f"L_obj={s.object_layer}, L_art={s.artifact_layer} keep the spec's depths")
    return (f"stages split at layer {s.split_layer} (artifact share "
            f"{curves.artifact_share[s.split_layer]:.3f} >= {share_min:g}); suggested "
            f"L_obj={s.object_layer}, L_art={s.artifact_layer}")


def format_table(curves: LayerCurves, suggestion: Suggestion) -> str:
    """Plain-text table, one row per layer; the split and the suggested layers are marked."""
    marks: dict[int, list[str]] = {}
    for name, at in (("split", suggestion.split_layer), ("L_obj", suggestion.object_layer),
                     ("L_art", suggestion.artifact_layer)):
        if at is not None:
            marks.setdefault(at, []).append(name)
    lines = [f"{curves.num_images} images, T = {curves.num_tokens} patch tokens, "
             f"max entropy log T = {math.log(curves.num_tokens):.3f}",
             "layer  entropy  artifact_share  high_norm_tokens  topk_overlap"]
    for layer in range(curves.num_layers):
        mark = "  <- " + ", ".join(marks[layer]) if layer in marks else ""
        lines.append(f"{layer:>5}  {curves.entropy[layer]:>7.3f}  "
                     f"{curves.artifact_share[layer]:>14.3f}  "
                     f"{curves.high_norm_tokens[layer]:>16.1f}  "
                     f"{curves.topk_overlap[layer]:>12.3f}{mark}")
    return "\n".join(lines)


def to_json(curves: LayerCurves, suggestion: Suggestion, config: CalibrationConfig,
            meta: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready report: settings, curves, suggestion, rule and `meta` (tower, size...)."""
    return {
        **meta, "config": dataclasses.asdict(config), "num_images": curves.num_images,
        "num_tokens": curves.num_tokens, "max_entropy": math.log(curves.num_tokens),
        "entropy": curves.entropy.tolist(), "artifact_share": curves.artifact_share.tolist(),
        "high_norm_tokens": curves.high_norm_tokens.tolist(),
        "topk_overlap": curves.topk_overlap.tolist(),
        "split_layer": suggestion.split_layer, "object_layer": suggestion.object_layer,
        "artifact_layer": suggestion.artifact_layer, "rule": suggestion.rule,
    }
