"""Shared fixtures: the offline tiny model (built if setup has not), real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from hero_core.tiny import build_tiny, is_built

    out = MODELS_DIR / "tiny"
    if not is_built(out):
        build_tiny(out)
    return out


@pytest.fixture(scope="session")
def vlm(tiny_dir: Path):
    from hero_core.models import load_vlm, resolve_spec

    return load_vlm(resolve_spec("tiny", tiny_dir.parent))


@pytest.fixture(scope="session")
def language_model(tiny_dir: Path):
    """The tiny checkpoint's language half, loaded once and shared by every engine."""
    from hero_core.models import resolve_spec
    from services.language.model import LanguageModel

    return LanguageModel(resolve_spec("tiny", tiny_dir.parent))


@pytest.fixture(scope="session")
def embeddings_model(tiny_dir: Path):
    """The tiny checkpoint's embedding parts only (what the vLLM engine loads)."""
    from hero_core.models import resolve_spec
    from services.language.model import LanguageModel

    return LanguageModel(resolve_spec("tiny", tiny_dir.parent), parts="embeddings")


@pytest.fixture(scope="session")
def pruner(vlm):
    from hero_core.pipeline import Pruner

    return Pruner(vlm.vision_encoder(), vlm.tiling, vlm.text_encoder)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real public-domain photo (scikit-image's astronaut, 512x512)."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
