"""The `vllm` extra installs: a dry run of `pip install hero-serve[vllm]` against the
package index (pip's own resolver over the real dependency metadata). Only metadata is
read, not the wheels (see `pip_report`): a run fetches ~100 MB, in ~1 minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRA = PROJECT["optional-dependencies"]["vllm"]


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
