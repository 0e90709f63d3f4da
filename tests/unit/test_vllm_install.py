"""The `vllm` extra installs, and the `language-vllm` image is built for the CUDA that the
pinned vLLM and torch wheels need.

Both ask the package index through pip: a dry run of `pip install hero-serve[vllm]`
(pip's own resolver over the real dependency metadata), and the metadata of the pinned
vllm and torch wheels (their Requires-Dist name the CUDA libraries they link). Only
metadata is read, not the wheels (see `pip_report`): a run fetches ~100 MB, in ~1 minute.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import only_loopback
from tests.unit.deploy_support import DOCKERFILE

# `make test` runs the unit suite on the machine's network; inside `.ci/isolated` (a
# private namespace with loopback alone, where `pytest tests` can run every suite in one
# process) there is no route to the package index to ask.
pytestmark = pytest.mark.skipif(only_loopback(), reason="the package index is not "
                                "reachable from a private network namespace")

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRA = PROJECT["optional-dependencies"]["vllm"]
# The image: linux x86_64, CPython 3.11 (what the wheels are read for).
PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
IMAGE_ENV = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "python_version": "3.11", "extra": ""}


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (`name==X`), base or `vllm` extra."""
    for line in [*PROJECT["dependencies"], *EXTRA]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == name:
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line}: pin it exactly"
            return spec.version
    raise AssertionError(f"pyproject.toml pins no {name}")


NOISE = ("WARNING: Location", "WARNING: pip is using lazily", "Looking in", "Collecting",
         "Processing", "  Obtaining", "  Downloading", "  Using cached", "     ")


def pip_report(args: list[str], tmp_path: Path) -> dict[str, Any]:
    """pip's `--report` of a dry-run install: resolution only, nothing is installed.

    `fast-deps`: pip reads each wheel's metadata with HTTP range requests where the index
    serves no separate metadata file, instead of downloading the wheel (vllm's is 300 MB,
    torch's 500 MB)."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--use-feature=fast-deps", "--report", str(report), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # pip's own account: the conflict and what causes it
        said = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and not line.startswith(NOISE)]
        pytest.fail(f"pip install {' '.join(args)} does not resolve (it needs the package "
                    "index):\n" + "\n".join(said[-30:]), pytrace=False)
    return dict(json.loads(report.read_text()))


def test_the_vllm_extra_resolves_with_the_pinned_vllm_torch_and_numpy(tmp_path):
    project = tmp_path / "hero-serve"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    # --no-build-isolation: our metadata is prepared with this venv's setuptools.
    report = pip_report(["--no-build-isolation", f"{project}[vllm]"], tmp_path)
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                for i in report["install"]}
    for name in ("vllm", "torch", "numpy"):
        assert name in resolved, f"{name} is not in the resolution"
        # a local build of the pinned release (torch 2.13.0+cpu) is that release
        assert Version(resolved[name].public) == Version(pin(name)), (
            f"{name}: pip chose {resolved[name]}, pyproject.toml pins {pin(name)}")


def cuda_needs(requires_dist: list[str]) -> tuple[set[int], set[Version]]:
    """The CUDA majors a wheel's requirements name (`nvidia-cudnn-cu13`, an extra
    `[cu13]`) and the CUDA toolkit versions they pin (`cuda-toolkit==13.0.3`), for
    what the image installs (its platform, no optional extras)."""
    majors: set[int] = set()
    toolkits: set[Version] = set()
    for line in requires_dist:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_ENV):
            continue
        for word in (requirement.name, *requirement.extras):
            if match := re.fullmatch(r"(?:.*-)?cu(\d\d)", word):
                majors.add(int(match.group(1)))
        if canonicalize_name(requirement.name) == "cuda-toolkit":
            toolkits |= {Version(s.version) for s in requirement.specifier if s.operator == "=="}
    return majors, toolkits


def test_the_language_vllm_image_is_built_on_the_cuda_of_the_pinned_wheels(tmp_path):
    # torch===: the release exactly as the index has it (not a local +cpu build)
    report = pip_report(["--no-deps", *PLATFORM, f"vllm=={pin('vllm')}",
                         f"torch==={pin('torch')}"], tmp_path)
    needs = {canonicalize_name(i["metadata"]["name"]): cuda_needs(i["metadata"]["requires_dist"])
             for i in report["install"]}
    (vllm_majors, _), (torch_majors, torch_toolkits) = needs["vllm"], needs["torch"]
    assert len(torch_toolkits) == 1, f"torch pins no single CUDA toolkit: {torch_toolkits}"
    (toolkit,) = torch_toolkits
    assert vllm_majors == torch_majors == {toolkit.major}, (
        f"vllm needs CUDA {vllm_majors}, torch CUDA {torch_majors} (toolkit {toolkit})")

    text = DOCKERFILE.read_text()
    cuda_stage = text.split("AS base-cuda")[1].split("\nFROM ")[0]
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+ AS base-cuda$", text, re.M)
    index = re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu(\d+)", cuda_stage)
    assert base and index, "base-cuda: an nvidia/cuda base and a torch index URL"
    assert int(base.group(1)) == toolkit.major, (
        f"base-cuda is CUDA {base.group(1)}.{base.group(2)}; the wheels need CUDA {toolkit}")
    assert index.group(1) == f"{toolkit.major}{toolkit.minor}", (
        f"torch comes from the cu{index.group(1)} index; the pinned torch is built for "
        f"CUDA {toolkit.major}.{toolkit.minor}")

    vllm_stage = text.split("AS language-vllm")[1].split("\nFROM ")[0]
    assert "['optional-dependencies']['vllm']" in vllm_stage, "install the `vllm` extra"
    assert "vllm==" not in vllm_stage, "the vLLM pin lives in pyproject.toml only"
    assert "-c /tmp/requirements.txt" in vllm_stage, "held to the project's pins"
