"""`hero`: the command-line client of HERO Serve.

    hero prune IMAGE --question Q --ratio R --method M [--viz out.png]

All plumbing lives here; the work is done by hero_core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hero_core.config import Limits
from hero_core.errors import HeroError
from hero_core.methods import METHODS


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny, llava-v1.6-vicuna-7b, ...), checkpoint dir or hub id")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("HERO_MODELS_DIR", "models")),
                        help="where `make setup` wrote the tiny model (env HERO_MODELS_DIR)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


def cmd_prune(args: argparse.Namespace) -> int:
    from hero_core.image import read_image
    from hero_core.methods import create_method
    from hero_core.models import load_vlm, resolve_spec
    from hero_core.pipeline import Pruner, check_ratio

    limits = Limits(max_image_pixels=args.max_image_pixels)
    check_ratio(args.ratio)
    method = create_method(args.method)
    image = read_image(args.image, limits)
    vlm = load_vlm(resolve_spec(args.model, args.models_dir, args.device, args.dtype))
    pruner = Pruner(vlm.vision_encoder(), vlm.tiling, vlm.text_encoder, limits)
    result = pruner.prune(image, args.question, method, args.ratio)
    packed = result.packed
    report: dict[str, Any] = {
        "image": str(args.image), "size": list(packed.image_size), "grid": list(packed.grid),
        "method": result.method, "ratio": result.ratio,
        "kept_per_crop": packed.counts_per_crop(), "kept": packed.num_tokens,
        "llm_image_tokens": packed.num_embeddings, "full_image_tokens": packed.full_tokens,
        "relevance": pruner.embed_question(args.question, method) is not None,
        "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
    }
    if args.viz:
        from hero_core.viz import draw_kept_tokens

        title = f"{result.method} R={result.ratio:g}"
        draw_kept_tokens(image, packed, result.grid, title).save(args.viz)
        report["viz"] = str(args.viz)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    counts = report["kept_per_crop"]
    print(f"image      {report['image']}  ({report['size'][1]}x{report['size'][0]} px, "
          f"grid {report['grid'][0]}x{report['grid'][1]})")
    print(f"method     {report['method']} at retention {report['ratio']:g}"
          f"  (question relevance {'on' if report['relevance'] else 'off'})")
    print(f"thumbnail  {counts[0]} tokens kept")
    for i, n in enumerate(counts[1:], start=1):
        print(f"tile {i:<5} {n} tokens kept")
    share = report["llm_image_tokens"] / report["full_image_tokens"]
    print(f"total      {report['kept']} tokens kept; LLM sees {report['llm_image_tokens']} "
          f"image embeddings (newlines included) of {report['full_image_tokens']} "
          f"unpruned = {share:.1%}")
    print("timings    " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["timings_ms"].items()))
    if "viz" in report:
        print(f"picture    {report['viz']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hero", description="HERO Serve command line")
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="prune one image's visual tokens and report them")
    prune.add_argument("image", type=Path)
    prune.add_argument("--question", "-q", default="", help="question that guides tile budgets")
    prune.add_argument("--ratio", "-r", type=float, default=0.111, help="retention in (0, 1]")
    prune.add_argument("--method", "-m", default="hero", choices=sorted(METHODS))
    prune.add_argument("--viz", type=Path, help="write a PNG of the kept tokens here")
    prune.add_argument("--json", action="store_true", help="print one JSON object")
    prune.add_argument("--max-image-pixels", type=int, default=Limits().max_image_pixels)
    add_model_args(prune)
    prune.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return int(args.func(args))
    except HeroError as exc:
        print(f"hero: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
