"""Stopping a pod or a container drains it instead of cutting its answers: each pod's
termination grace covers its preStop wait and the drain it is configured for, each
drain covers the longest call the system makes, and Compose waits as long."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.unit.deploy_support import DOCKERFILE, by_kind

MARGIN_S = 15
"""What a pod needs beyond its drain to stop its processes."""
KUBERNETES_DEFAULT_GRACE_S = 30
RAY_DEFAULT_DRAIN_S = 30.0
"""`ray start`'s RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S where the pod does not set it."""
DRAINING = {"language", "ray-head", "ray-worker"}
"""Containers that serve long streamed answers."""


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment and every RayService group."""
    pods = [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in by_kind(docs, "Deployment")]
    for service in by_kind(docs, "RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        pods.append((f"{service['metadata']['name']}/head",
                     cluster["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{service['metadata']['name']}/{group['groupName']}",
                  group["template"]["spec"]) for group in cluster["workerGroupSpecs"]]
    return pods


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def prestop_s(container: dict[str, Any]) -> float:
    handler = container.get("lifecycle", {}).get("preStop")
    if handler is None:
        return 0.0
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def drain_s(container: dict[str, Any]) -> float:
    """How long the container's process drains after SIGTERM, as configured."""
    from services.language.config import LanguageConfig

    if container["name"] == "language":
        default = LanguageConfig.model_fields["shutdown_grace_s"].default
        return float(env(container).get("HERO_LANGUAGE_SHUTDOWN_GRACE_S", default))
    if container["name"].startswith("ray-"):
        return float(env(container).get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S",
                                        RAY_DEFAULT_DRAIN_S))
    return 0.0


def test_every_pod_grace_covers_its_prestop_and_its_drain(rendered):
    _, docs = rendered
    pods = pod_specs(docs)
    assert {name for name, _ in pods} >= {"hero-language", "hero-redis", "hero-vision/head",
                                          "hero-vision/encoder"}
    for name, pod in pods:
        grace = pod.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE_S)
        for container in pod["containers"]:
            needed = prestop_s(container) + drain_s(container) + MARGIN_S
            assert grace >= needed, (name, container["name"], grace, needed)
            if container["name"] in DRAINING:
                assert prestop_s(container) > 0, (name, "no preStop wait")
                assert drain_s(container) > 0, (name, "no drain")


def serve_deployments(docs: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """The vision app's args and its deployments' settings, from serveConfigV2."""
    from services.vision.config import VisionConfig

    (service,) = by_kind(docs, "RayService")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    return (VisionConfig.model_validate(app["args"]),
            {d["name"]: d for d in app["deployments"]})


def test_the_drains_cover_the_longest_call(rendered):
    """The longest call is a language call of the vision service (language_timeout_s): a
    language pod drains at least that long, an ingress replica Serve stops gets that long
    to finish its answers, and a Ray pod drains its node for that plus the time Serve
    keeps a draining proxy."""
    from ray.serve._private.constants import PROXY_MIN_DRAINING_PERIOD_S

    _, docs = rendered
    args, deployments = serve_deployments(docs)
    longest = args.language_timeout_s
    (language,) = [c for name, pod in pod_specs(docs) for c in pod["containers"]
                   if name == "hero-language" and c["name"] == "language"]
    assert drain_s(language) >= longest
    ingress_grace = deployments["VisionIngress"]["graceful_shutdown_timeout_s"]
    assert ingress_grace >= longest + 10
    assert deployments["Encoder"]["graceful_shutdown_timeout_s"] > 20  # Serve's default
    ray_pods = [c for _, pod in pod_specs(docs) for c in pod["containers"]
                if c["name"].startswith("ray-")]
    assert {c["name"] for c in ray_pods} == {"ray-head", "ray-worker"}
    for container in ray_pods:
        assert drain_s(container) >= ingress_grace + PROXY_MIN_DRAINING_PERIOD_S


def test_prestop_waits_use_a_binary_every_image_has():
    """`sleep` (coreutils) is in both base images: Debian's python slim and NVIDIA's
    Ubuntu CUDA runtime."""
    bases = re.findall(r"^FROM (\S+) AS base-", DOCKERFILE.read_text(), re.M)
    assert len(bases) == 2
    assert all(re.search(r"python:3\.11-slim-bookworm$|ubuntu\d", b) for b in bases), bases


def seconds(duration: str) -> float:
    """A Compose duration ("320s", "5m", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_waits_for_the_drains():
    from services.language.config import LanguageConfig
    from services.vision.drain import ingress_grace_s

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    serve = yaml.safe_load((ROOT / "services" / "vision" / "serve_config.yaml").read_text())
    for name in ("language", "language-gpu"):
        grace = float(compose[name]["environment"].get(
            "HERO_LANGUAGE_SHUTDOWN_GRACE_S",
            LanguageConfig.model_fields["shutdown_grace_s"].default))
        assert seconds(compose[name]["stop_grace_period"]) >= grace + MARGIN_S, name
    for name in ("vision", "vision-gpu"):
        assert seconds(compose[name]["stop_grace_period"]) >= ingress_grace_s(serve) + MARGIN_S
