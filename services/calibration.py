"""Calibration's sample photos and its plot: what `hero calibrate` needs beside the
measurement itself (`hero_core.calibrate`), kept out of the algorithm library because
they pull in scikit-image and matplotlib (both imported only when used)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from hero_core.calibrate import LayerCurves, Suggestion

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera",
                  "coins", "hubble_deep_field")


def default_images() -> list[Image.Image]:
    """`DEFAULT_PHOTOS` from scikit-image (grey ones as RGB)."""
    import skimage.data

    images = []
    for name in DEFAULT_PHOTOS:
        array = getattr(skimage.data, name)()
        images.append(Image.fromarray(array[0] if isinstance(array, tuple) else array))
    return images


def plot_curves(curves: LayerCurves, suggestion: Suggestion, path: Path, title: str) -> None:
    """PNG of the three curves per layer (entropy as a share of log T) with the
    suggested layers and the split marked."""
    import matplotlib

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
