"""The package built from this repository works without `make setup`: it carries the
gRPC code generated from protos/, so the SDK imports from it alone."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("hero_core", "services", "evals", "protos", "setup.py", "pyproject.toml",
           "MANIFEST.in", "README.md")

CHECK = """
import sys
wheel_dir, site_packages = sys.argv[1], sys.argv[2]
# -S: no .pth files, so neither the editable install nor build/gen is on the path
sys.path[:0] = [wheel_dir, site_packages]
from services.sdk.vision import VisionClient
import services.sdk.vision, hero.vision.v1.vision_pb2_grpc as stubs
for module in (services.sdk.vision, stubs):
    assert module.__file__.startswith(wheel_dir), module.__file__
client = VisionClient("127.0.0.1:1")
client.close()
print("ok")
"""


def test_the_built_wheel_carries_the_generated_protos_and_the_sdk_imports_from_it(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    # --no-build-isolation: the build requirements (setuptools, grpcio-tools) are this
    # venv's, so the test needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("hero_serve-*.whl")
    unpacked = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(unpacked)
    for proto in ("common/v1/tensor", "language/v1/language", "vision/v1/vision"):
        assert f"hero/{proto}_pb2.py" in names and f"hero/{proto}_pb2.pyi" in names
    assert "hero/vision/v1/vision_pb2_grpc.py" in names
    for page in ("index.html", "playground.js", "playground.css"):  # the playground page
        assert f"services/vision/playground/{page}" in names
    result = subprocess.run([sys.executable, "-S", "-c", CHECK, str(unpacked),
                             sysconfig.get_paths()["purelib"]],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
