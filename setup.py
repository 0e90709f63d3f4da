"""Build hook: a built package carries the gRPC code generated from `protos/`.

`pip install .` (or a wheel built from this repository) generates the `hero.*.v1`
modules into the package, so the SDK works without `make setup`. An editable install
(`pip install -e .`, what `make setup` does) leaves them to the Makefile, which
generates them into `build/gen` on the venv's path. Everything else is in
pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOS = Path(__file__).resolve().parent / "protos"


class BuildPyWithProtos(build_py):
    """build_py, then protoc over every .proto into the build's package tree."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
        out = Path(self.build_lib).resolve()
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
                        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                        *files], check=True, cwd=PROTOS)


setup(cmdclass={"build_py": BuildPyWithProtos})
