import subprocess
import sys

# Services' dependencies, and the measurement tools' (evals/): hero_core is the
# algorithm library and imports none of them.
FORBIDDEN = ("ray", "grpc", "google.protobuf", "redis", "pydantic", "matplotlib", "skimage",
             "onnx", "onnxruntime", "lmms_eval", "evals")


def test_hero_core_imports_no_service_dependency():
    code = (
        "import sys, pkgutil, importlib, hero_core\n"
        "for m in pkgutil.walk_packages(hero_core.__path__, 'hero_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} "
        f"or m.startswith('google.protobuf')]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"hero_core pulled in: {out.stdout.strip()}"
