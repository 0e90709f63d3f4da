"""`hero calibrate`: the command, its arguments, its sample photos and its plot, beside
the measurement itself (`hero_core.calibrate`). Kept out of the algorithm library
because they pull in scikit-image and matplotlib (both imported only when used)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_core.config import Limits
from services.towers import add_tower_args, load_tower

if TYPE_CHECKING:
    from PIL import Image

    from hero_core.calibrate import LayerCurves, Suggestion

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera",
                  "coins", "hubble_deep_field")


def default_images() -> list[Image.Image]:
    """`DEFAULT_PHOTOS` from scikit-image (grey ones as RGB)."""
    import skimage.data
    from PIL import Image

    images = []
    for name in DEFAULT_PHOTOS:
        array = getattr(skimage.data, name)()
        images.append(Image.fromarray(array[0] if isinstance(array, tuple) else array))
    return images


def plot_curves(curves: LayerCurves, suggestion: Suggestion, path: Path, title: str) -> None:
    """PNG of the three curves per layer (entropy as a share of log T) with the
    suggested layers and the split marked."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(curves.num_layers)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(layers, curves.entropy / math.log(curves.num_tokens), "o-",
            label="CLS entropy / log T")
    ax.plot(layers, curves.artifact_share, "s-", label="attention share on high-norm tokens")
    ax.plot(layers, curves.topk_overlap, "^-", label="top-k overlap with last layers")
    for at, style, name in ((suggestion.object_layer, "g--", "L_obj"),
                            (suggestion.artifact_layer, "r--", "L_art"),
                            (suggestion.split_layer, "k:", "split")):
        if at is not None:
            ax.axvline(at, color=style[0], linestyle=style[1:], label=f"{name} = {at}")
    ax.set(xlabel="layer (0-based)", ylabel="value in [0, 1]", ylim=(-0.02, 1.05), title=title)
    ax.set_xticks(layers)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_calibrate_parser(sub: Any) -> None:
    from hero_core.config import CalibrationConfig

    default = CalibrationConfig()
    cal = sub.add_parser("calibrate", help="measure a tower's CLS-attention stages per layer "
                                           "and suggest HERO's L_obj and L_art")
    cal.add_argument("images", type=Path, nargs="*",
                     help="image files or folders (default: scikit-image's bundled photos)")
    cal.add_argument("--norm-std-factor", type=float, default=default.norm_std_factor,
                     help="k: high-norm tokens have norm > mean + k*std")
    cal.add_argument("--top-k", type=int, default=default.top_k)
    cal.add_argument("--reference-layers", type=int, default=default.reference_layers,
                     help="final layers whose mean CLS row is the top-k reference")
    cal.add_argument("--share-min", type=float, default=default.share_min,
                     help="artifact stage: attention share on high-norm tokens >= this")
    cal.add_argument("--batch-size", type=int, default=default.batch_size)
    cal.add_argument("--json", type=Path, help="write the curves and suggestion here")
    cal.add_argument("--plot", type=Path, help="write a PNG of the curves here")
    add_tower_args(cal)
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hero_core import calibrate as cal
    from hero_core.config import CalibrationConfig
    from hero_core.image import read_image

    config = CalibrationConfig(norm_std_factor=args.norm_std_factor, top_k=args.top_k,
                                   reference_layers=args.reference_layers,
                                   share_min=args.share_min, batch_size=args.batch_size)
    paths = [p for path in args.images for p in image_files(path)]
    images = [read_image(p, Limits()) for p in paths] if paths else default_images()
    encoder, tiling, _ = load_tower(args, with_relevance=False)
    pixels = cal.prepare_images(images, tiling)
    curves = cal.measure(encoder, pixels, config)
    suggestion = cal.suggest_layers(curves, config.share_min)
    tower = args.tower or args.model
    print(f"{tower} ({encoder.kind}, {encoder.num_layers} layers) at {pixels.shape[-1]} px")
    print(cal.format_table(curves, suggestion))
    print(cal.describe(suggestion, curves, config.share_min))
    print(f"rule: {suggestion.rule}")
    print(f"use: --option object_layer={suggestion.object_layer} "
          f"--option artifact_layer={suggestion.artifact_layer}")
    meta = {"tower": tower, "kind": encoder.kind, "size": int(pixels.shape[-1]),
            "images": [str(p) for p in paths] or [f"skimage.data.{n}" for n in DEFAULT_PHOTOS]}
    if args.json:
        args.json.write_text(json.dumps(cal.to_json(curves, suggestion, config, meta), indent=1))
        print(f"json: {args.json}")
    if args.plot:
        plot_curves(curves, suggestion, args.plot, f"{tower} at {pixels.shape[-1]} px")
        print(f"plot: {args.plot}")
    return 0


def image_files(path: Path) -> list[Path]:
    """`path` itself, or the image files directly inside the folder `path`, sorted."""
    if not path.is_dir():
        return [path]
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    return sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
