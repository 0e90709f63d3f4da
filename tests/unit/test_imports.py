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


# ---- the import graph of our own modules ----------------------------------------------

PACKAGES = ("hero_core", "services", "evals", "loadtest")
LAYERS = {"hero_core": {"hero_core"}, "services": {"hero_core", "services"},
          "evals": {"hero_core", "evals"}, "loadtest": set(PACKAGES)}
"""What each package may import: hero_core at the bottom, services and evals side by side
above it (neither importing the other), loadtest on top."""


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, wherever the import statement sits (at
    the top, inside a function, under `TYPE_CHECKING`): a function-local import hides a
    cycle from Python until the function runs, not from this graph."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    paths = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.update(f"{node.module}.{alias.name}"
                               if f"{node.module}.{alias.name}" in paths else node.module
                               for alias in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected parts of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            part = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(part) > 1:
                found.append(sorted(part))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_module_of_ours_takes_part_in_an_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_function_local_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    # services/cli.py imports hero_core.pipeline inside `cmd_prune` only
    assert "hero_core.pipeline" in real["services.cli"]


def test_each_package_imports_only_the_layers_below_it():
    crossing = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                      for target in targets
                      if target.split(".")[0] not in LAYERS[module.split(".")[0]])
    assert crossing == []
