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


def imported_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nprint(','.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.strip().splitlines()[-1].split(","))


def test_hero_help_answers_without_importing_torch():
    modules = imported_by("import sys\nfrom services.cli import main\n"
                          "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in modules and "transformers" not in modules


def test_method_names_the_cli_offers_are_the_registry():
    from hero_core.config import METHOD_NAMES
    from hero_core.methods import METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)


def test_production_code_does_not_lean_on_dev_code_or_ray_internals():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # the container's entry point runs the app without the local launcher
    assert "services.local" not in imported_by("import sys\nimport services.vision.__main__")
    # the ingress speaks to clients; it does not borrow from the client SDK
    assert "services.sdk.vision" not in imported_by("import sys\nimport services.vision.ingress")
    private = [str(p.relative_to(root)) for folder in ("hero_core", "services", "evals")
               for p in (root / folder).rglob("*.py")
               if "ray._private" in p.read_text() or "ray.serve._private" in p.read_text()]
    assert not private, f"Ray's private modules used in {private}"
