"""What the deployment tests share: where the files are, kustomize, and walks over
rendered manifests and the Compose file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

# Third-party schemas the tests validate against, carried with their licences
# (tests/schemas/*/SOURCE.md says where each came from).
SCHEMAS = ROOT / "tests" / "schemas"
DOCKERFILE = ROOT / "services" / "Dockerfile"
SERVICE_TARGETS = {"language", "language-vllm", "vision"}
OVERLAYS = ("dev", "gpu")


def kubectl() -> str:
    found = shutil.which("kubectl") or str(ROOT / "build" / "kubectl" / "kubectl")
    assert Path(found).exists(), "no kubectl: `make setup` runs .ci/fetch_kubectl"
    return found




def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]



def release() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]



def env_field_exists(model: Any, name: str, prefix: str) -> bool:
    path = name[len(prefix):].lower().split("__")
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            model = field.annotation
    return True


def nodes(tree: Any) -> list[dict[str, Any]]:
    """Every mapping inside a parsed YAML tree."""
    if isinstance(tree, dict):
        return [tree, *(n for v in tree.values() for n in nodes(v))]
    if isinstance(tree, list):
        return [n for v in tree for n in nodes(v)]
    return []


def all_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for node in nodes(docs)
            if isinstance(node.get("env"), list) for e in node["env"]}


def compose_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env: dict[str, str] = {}
    for service in compose["services"].values():
        env.update(service.get("environment", {}))
    return env


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container and init container of the rendered manifests."""
    return [c for node in nodes(docs) for key in ("containers", "initContainers")
            if isinstance(node.get(key), list) for c in node[key]]
