"""The vision RayService as the KubeRay operator (v1.7.0) turns it into Kubernetes objects.

KubeRay does not create the `spec.serveService` we write: it builds the serve Service
itself (ray-operator/controllers/ray/common/service.go, BuildServeService), keeping only
the head container's ports named `serve` or `serve-*` (isServingPort); a port of our
serveService survives only by replacing the serving port of the same name. A gRPC port
named `grpc` is therefore dropped while the RayService reports Ready. The operator also
injects default probes into Ray containers that have none
(ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe; thresholds in
ray-operator/controllers/ray/utils/constant.go). These tests rebuild both from the
rendered manifests by those rules (`deploy_support.kuberay_serve_service`)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.unit.deploy_support import (
    by_kind,
    kuberay_serve_service,
    service_ports,
)


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = by_kind(docs, "RayService")
    return service


def _ray_containers(service: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(node type, group, Ray container) of the head and every worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [
        ("worker", g) for g in cluster["workerGroupSpecs"]]
    return [(node, group, group["template"]["spec"]["containers"][0]) for node, group in groups]


def test_kuberays_rule_drops_a_grpc_port_not_named_serve():
    """The rule itself, on the port names this repository used before: the Service would
    have had HTTP only."""
    head = {"ports": [{"name": "serve", "containerPort": 8000},
                      {"name": "grpc", "containerPort": 9000}]}
    service = {"metadata": {"name": "x"}, "spec": {
        "serveService": {"metadata": {"name": "public"},
                         "spec": {"ports": [{"name": "grpc", "port": 9000}]}},
        "rayClusterConfig": {"headGroupSpec": {"template": {"spec": {"containers": [head]}}}}}}
    assert service_ports(kuberay_serve_service(service)) == {8000: 8000}
    head["ports"][1]["name"] = "serve-grpc"
    assert service_ports(kuberay_serve_service(service)) == {8000: 8000, 9000: 9000}


def test_every_port_that_is_named_exists_on_the_serve_service(rendered):
    """The Ingress's backend, the NetworkPolicy's public port, docs/DEPLOY.md's
    port-forward and the Serve proxy the probes check are ports KubeRay's Service has."""
    _, docs = rendered
    rayservice = _rayservice(docs)
    serve = kuberay_serve_service(rayservice)
    ports = service_ports(serve)
    name = serve["metadata"]["name"]
    # what we wrote is what KubeRay makes of it (no port silently dropped or added)
    assert ports == service_ports(rayservice["spec"]["serveService"])
    grpc_port = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["grpc_options"]["port"]
    assert ports.get(grpc_port) == grpc_port

    ingress = next(d for d in docs if d["kind"] == "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == name and backend["port"]["number"] in ports

    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "hero-vision-ingress")
    public = {p["port"] for r in policy["spec"]["ingress"]
              if any("ingress-nginx" in str(peer) for peer in r.get("from", []))
              for p in r["ports"]}
    assert public and public <= set(ports.values())

    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    forwards = re.findall(r"port-forward svc/([\w-]+) (\d+):(\d+)", deploy)
    assert forwards, "DEPLOY.md shows no port-forward"
    for service_name, _, remote in forwards:
        assert (service_name, int(remote) in ports) == (name, True), (service_name, remote)

    from services import healthcheck

    for node, _, container in _ray_containers(rayservice):
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named["serve-grpc"] == grpc_port and named["serve"] in ports, node
        probe = container["readinessProbe"]
        if "exec" in probe:
            args = healthcheck.parser().parse_args(probe["exec"]["command"][3:])
            assert args.serve_port == named["serve"], node


# ---- KubeRay's default probes --------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])


def kuberay_probes(node: str, ray_version: str, start_params: dict[str, str],
                   container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What KubeRay v1.7.0 injects into a RayService's Ray container without probes.

    Liveness: 30 s initial delay, every 5 s, 120 failures; readiness: 10 s, every 5 s, 10
    failures; timeouts 5 s on the head, 2 s on workers. Ray >= 2.53 (one health endpoint)
    is checked by an HTTP GET of the dashboard agent's /api/healthz; older Ray by `wget`
    of the raylet (and, on the head, the GCS). A worker's readiness also needs its Serve
    proxy (`-/healthz` on the container's `serve` port) and fails after one miss: that
    check is always a `wget` command, returned here as the URLs it fetches."""
    agent = int(start_params.get("dashboard-agent-listen-port", 52365))
    dashboard = int(start_params.get("dashboard-port", 8265))
    serve = next((p["containerPort"] for p in container.get("ports", [])
                  if p.get("name") == "serve"), 8000)
    urls = [f"http://localhost:{agent}/api/local_raylet_healthz"]
    if node == "head":
        urls.append(f"http://localhost:{dashboard}/api/gcs_healthz")
    check: dict[str, Any] = {"httpGet": {"path": "/api/healthz", "port": agent}} \
        if _version(ray_version) >= (2, 53) else {"urls": urls}
    timeout = 5 if node == "head" else 2
    live = {"initialDelaySeconds": 30, "timeoutSeconds": timeout, "periodSeconds": 5,
            "successThreshold": 1, "failureThreshold": 120, **check}
    ready = {"initialDelaySeconds": 10, "timeoutSeconds": timeout, "periodSeconds": 5,
             "successThreshold": 1, "failureThreshold": 10, **check}
    if node == "worker":
        ready = {**ready, "failureThreshold": 1,
                 "urls": [*urls, f"http://localhost:{serve}/-/healthz"]}
        ready.pop("httpGet", None)
    return {"livenessProbe": live, "readinessProbe": ready}


TIMING = ("initialDelaySeconds", "periodSeconds", "successThreshold", "failureThreshold")


def test_ray_probes_are_kuberays_defaults_without_wget(rendered):
    """Where KubeRay's default is an HTTP GET ours is exactly it; where it runs `wget`
    (absent from our images) ours runs `python -m services.healthcheck`, which fetches
    the same URLs, with the same thresholds and a timeout that fits every check."""
    from services import healthcheck

    _, docs = rendered
    rayservice = _rayservice(docs)
    version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    for node, group, container in _ray_containers(rayservice):
        expected = kuberay_probes(node, version, group["rayStartParams"], container)
        for kind, want in expected.items():
            probe = container[kind]
            if "httpGet" in want:
                assert probe == want, (node, kind)
                continue
            assert {k: probe.get(k) for k in TIMING} == {k: want[k] for k in TIMING}, \
                (node, kind)
            command = probe["exec"]["command"]
            assert command[:3] == ["python", "-m", "services.healthcheck"]
            args = healthcheck.parser().parse_args(command[3:])
            urls = healthcheck.ray_checks(args.ray_node, args.live, args.agent_port,
                                          args.dashboard_port, args.serve_port)
            assert urls == want["urls"], (node, kind)
            assert probe["timeoutSeconds"] >= want["timeoutSeconds"]
            assert len(urls) * args.timeout < probe["timeoutSeconds"], (node, kind)


def test_the_autoscaler_sidecar_is_locked_down(rendered):
    """KubeRay adds the autoscaler container to the head pod from `autoscalerOptions`;
    it runs under the pod's non-root, seccomp context and its own container context."""
    _, docs = rendered
    cluster = _rayservice(docs)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    context = cluster["autoscalerOptions"]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context.get("privileged") is not True and context.get("runAsUser") != 0
    pod = cluster["headGroupSpec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[:-2]) * factor)
    return int(quantity)


def test_shared_memory_and_memory_limits_leave_room_beside_the_object_store(rendered):
    """Ray puts its object store in /dev/shm only when the volume has room for all of it
    (ray._private.services.determine_plasma_store_config), and suggests 10 % more, since
    torch and NCCL share the volume. The in-memory volume counts against the container's
    memory limit, so the limit holds a full shm and at least 1 GiB for the Ray processes,
    and the store is at most half of it (Ray's default is 30 %)."""
    _, docs = rendered
    for node, group, container in _ray_containers(_rayservice(docs)):
        name = group.get("groupName", node)
        store = int(group["rayStartParams"]["object-store-memory"])
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory", name
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"], name
        size = _bytes(shm["emptyDir"]["sizeLimit"])
        assert size >= 1.1 * store, (name, size, store)
        limit = _bytes(container["resources"]["limits"]["memory"])
        assert limit - size >= 1 << 30, (name, limit, size)
        assert store <= limit / 2, (name, store, limit)
