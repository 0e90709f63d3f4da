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


# ---- KubeRay's serve Service ---------------------------------------------------------
# KubeRay v1.7.0, ray-operator/controllers/ray/common/service.go: BuildServeService (the
# RayService case), getServicePorts, getPortsFromCluster, isServingPort; names and default
# ports from ray-operator/controllers/ray/utils/constant.go.
KUBERAY_DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265,
                         "metrics": 8080, "serve": 8000}


def serving_port(name: str) -> bool:
    """KubeRay keeps a head port in the serve Service when it is named `serve` or `serve-*`."""
    return name == "serve" or name.startswith("serve-")


def kuberay_serve_service(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The serve Service KubeRay creates for `rayservice` (no incremental upgrade).

    Candidate ports are the head group's Ray container's (containers[0]) ports, an
    unnamed one called "<port>-port"; a container without ports gets KubeRay's defaults,
    and `metrics` 8080 is added when missing. The serving ones among them (`serve`,
    `serve-*`) become the Service's ports, as name and port (the target port is the same
    number). With `spec.serveService` given, a port of it replaces the serving port of
    the same name and its other ports are dropped; only when the head has no serving port
    are its ports kept as written. Neither: KubeRay creates no Service (an error here).
    The selector is always KubeRay's: the cluster's pods whose Serve proxy is healthy."""
    spec = rayservice["spec"]
    assert "upgradeStrategy" not in spec or spec["upgradeStrategy"].get("type") != \
        "NewClusterWithIncrementalUpgrade", "incremental upgrades ignore serveService"
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"]
             for p in head.get("ports", [])} or dict(KUBERAY_DEFAULT_PORTS)
    ports.setdefault("metrics", KUBERAY_DEFAULT_PORTS["metrics"])
    serving = [{"name": n, "port": p} for n, p in ports.items() if serving_port(n)]
    given = spec.get("serveService")
    if given is None:
        assert serving, "no port named serve or serve-*: KubeRay creates no serve Service"
        return {"metadata": {"name": f"{rayservice['metadata']['name']}-serve-svc"},
                "spec": {"ports": serving, "selector": {"ray.io/serve": "true"}}}
    user = {p.get("name"): p for p in given["spec"].get("ports", [])}
    merged = [user.get(p["name"], p) for p in serving] if serving else list(user.values())
    return {"metadata": {**given["metadata"],
                         "name": given["metadata"].get("name") or
                         f"{rayservice['metadata']['name']}-serve-svc"},
            "spec": {**given["spec"], "ports": merged, "selector": {"ray.io/serve": "true"}}}


def service_ports(service: dict[str, Any]) -> dict[int, int]:
    """A Service's port -> the container port it forwards to."""
    return {p["port"]: int(p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
