"""Shared fixtures: the offline tiny model (built if setup has not), real photos."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"

def only_loopback() -> bool:
    """Whether this process sees no network but loopback (`.ci/isolated`'s namespace)."""
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


LIBRARY_DEFAULTS = frozenset({"RAY_CLIENT_MODE", "TORCHINDUCTOR_CACHE_DIR"})
"""Variables a library sets to its own default the first time it is imported or used
(`import ray`; torch's compile cache directory): the same in every test order."""

LEAKS: list[str] = []
"""Tests after which the process's environment or working directory differed."""


def process_state() -> tuple[dict[str, str], str]:
    return dict(os.environ), os.getcwd()


def state_changes(before: tuple[dict[str, str], str],
                  after: tuple[dict[str, str], str]) -> list[str]:
    """What a test changed of the process state every later test inherits."""
    (env_before, cwd_before), (env_after, cwd_after) = before, after
    changed = [f"${name}" for name in sorted(env_before.keys() | env_after.keys())
               if env_before.get(name) != env_after.get(name) and name not in LIBRARY_DEFAULTS]
    return changed + ([f"cwd {cwd_before} -> {cwd_after}"] if cwd_before != cwd_after else [])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test (its fixtures' setup and teardown included) leaves the environment and
    working directory as it found them: `pytest tests` runs every suite in one process."""
    before = process_state()
    yield
    changes = state_changes(before, process_state())
    if changes:
        LEAKS.append(f"{item.nodeid}: {', '.join(changes)}")


def pytest_sessionfinish(session, exitstatus):
    if LEAKS and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if LEAKS:
        terminalreporter.section("process state left behind")
        for line in LEAKS:
            terminalreporter.line(line)


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
def packed(pruner, photo):
    """HERO's tokens of the photo for one question at retention 0.111 (tests read them,
    never change them)."""
    from hero_core.methods import create_method

    return pruner.prune(photo, "What is held?", create_method("hero"), 0.111).packed


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real public-domain photo (scikit-image's astronaut, 512x512)."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
