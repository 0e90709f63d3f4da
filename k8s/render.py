"""Render the KubeRay RayService of the vision service from the repo's Serve config.

    python k8s/render.py           # rewrite k8s/base/vision-rayservice.yaml and the gpu patch
    python k8s/render.py --check   # exit 1 if the committed files are out of date

`serveConfigV2` is `services/vision/serve_config.yaml` with only the cluster-specific
values below changed (service addresses, paths, and for the gpu overlay the model,
device and GPU resources), so the local, compose and Kubernetes deployments run the
same application definition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from services.common.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "services" / "vision" / "serve_config.yaml"
RAYSERVICE = ROOT / "k8s" / "base" / "vision-rayservice.yaml"
GPU_PATCH = ROOT / "k8s" / "overlays" / "gpu" / "serve-config-patch.yaml"
RAY_VERSION = "2.60.0"
SERVE_PORT = 8000
"""Serve's HTTP proxy in the cluster: KubeRay checks each proxy's health there."""

CLUSTER_ARGS: dict[str, Any] = {
    "models_dir": "/models",
    # Every language pod's address (headless Service), balanced call by call; the pods
    # close connections after max_connection_age_s, so pods the HPA adds are found.
    "language_target": "dns:///hero-language-headless.hero-serve.svc.cluster.local:50052",
    "cache": {"url": "redis://hero-redis:6379/0"},
}
GPU_ARGS: dict[str, Any] = {
    "model": "llava-v1.6-vicuna-7b", "device": "cuda", "dtype": "float16",
    # Production: Redis over TLS, CA from the secret hero-redis-tls.
    "cache": {"url": "rediss://hero-redis:6379/0", "tls_ca_file": "/etc/hero/redis-tls/ca.crt"},
}
GPU_DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "Encoder": {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1}},
}


def serve_config(gpu: bool) -> dict[str, Any]:
    """The repo's Serve config with the cluster's (and optionally the GPU) values."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "0.0.0.0", "port": SERVE_PORT}
    app = config["applications"][0]
    app["args"] = deep_merge(app["args"], CLUSTER_ARGS)
    if gpu:
        app["args"] = deep_merge(app["args"], GPU_ARGS)
        for deployment in app["deployments"]:
            deployment.update(deep_merge(deployment, GPU_DEPLOYMENTS.get(deployment["name"], {})))
    return config


def proxy_env() -> list[dict[str, Any]]:
    """Serve's gRPC proxy bound (it reads it from the environment of the pods it runs in),
    from the app's limits; the same for both overlays."""
    from services.vision.config import VisionConfig

    args = VisionConfig.model_validate(serve_config(gpu=False)["applications"][0]["args"])
    return [{"name": k, "value": v} for k, v in args.proxy_env().items()]


PRESTOP_S = 5
"""A stopping pod waits this long (preStop) before it drains, so the Service's endpoints and
ingress-nginx stop sending it new calls first."""
PROXY_DRAIN_S = 30
"""Serve keeps a draining node's proxy at least this long (its
RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S) before it lets the node go."""
POD_MARGIN_S = 25
"""Ray's own teardown after the drain, within the pod's termination grace."""


def ray_drain_s() -> int:
    """How long a stopping Ray pod drains its node (`ray start`'s
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S): Serve moves the node's replicas, each finishing
    its calls within the VisionIngress deployment's graceful_shutdown_timeout_s, and drains
    the node's proxy."""
    from services.vision.drain import ingress_grace_s

    return int(ingress_grace_s(serve_config(gpu=False))) + PROXY_DRAIN_S


# Ray's object store lives in /dev/shm: each group's in-memory shm volume holds its store
# with room to spare (Ray falls back to disk when the store does not fit, and torch and
# NCCL share the same volume), and the memory limit, which the volume counts against,
# holds a full shm plus the Ray processes. Bytes.
OBJECT_STORE = {"head": 512 << 20, "worker": 1536 << 20}
SHM = {"head": "1Gi", "worker": "2Gi"}

# KubeRay's default probes (ray-operator/controllers/ray/common/pod.go,
# initLivenessAndReadinessProbe; thresholds in utils/constant.go), for Ray >= 2.53:
# liveness and the head's readiness GET the dashboard agent's /api/healthz (raylet, and the
# GCS on the head); a RayService worker is ready only while its Serve proxy answers too,
# checked by a `wget` command (absent from our images) that fails the pod after one miss.
AGENT_PORT = 52365


def _probe(node: str, live: bool) -> dict[str, Any]:
    """KubeRay's default probe of a `node` ("head" or "worker"), `wget` replaced by
    `python -m services.healthcheck` where KubeRay would run it."""
    timing = {"initialDelaySeconds": 30 if live else 10,
              "timeoutSeconds": 5 if node == "head" else 2,
              "periodSeconds": 5, "successThreshold": 1,
              "failureThreshold": 120 if live else 10}
    if live or node == "head":
        return {"httpGet": {"path": "/api/healthz", "port": AGENT_PORT}, **timing}
    # The worker's readiness: raylet and Serve proxy, one failure takes it out of the
    # serve Service. A Python process starts slower than wget: 2 s per check, 5 s in all.
    command = ["python", "-m", "services.healthcheck", "--ray-node", node,
               "--agent-port", str(AGENT_PORT), "--serve-port", str(SERVE_PORT),
               "--timeout", "2"]
    return {"exec": {"command": command}, **timing, "timeoutSeconds": 5,
            "failureThreshold": 1}


def locked_down() -> dict[str, Any]:
    """The security context of every container (the pod's adds non-root and seccomp)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _container(name: str, ports: list[tuple[str, int]], cpu: str, memory: str) -> dict[str, Any]:
    node = "head" if name == "ray-head" else "worker"
    return {
        "name": name,
        "image": "hero-serve/vision",
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
            # On SIGTERM `ray start` drains its node for up to this long before it stops:
            # Serve's proxy there stops taking calls and its replicas move, finishing theirs.
            {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(ray_drain_s())},
            *proxy_env(),
            {"name": "HERO_VISION_CACHE__PASSWORD",
             "valueFrom": {"secretKeyRef": {"name": "hero-redis-auth", "key": "password"}}},
            # Every secret is required: a pod whose secret is missing does not start
            # (the service would refuse to start without API tokens anyway).
            # Bearer tokens of the public API.
            {"name": "HERO_VISION_API_TOKENS",
             "valueFrom": {"secretKeyRef": {"name": "hero-api-tokens", "key": "tokens"}}},
            # The token the language service accepts (the secret of its
            # HERO_LANGUAGE_API_TOKENS).
            {"name": "HERO_VISION_LANGUAGE_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": "hero-internal-token", "key": "token"}}},
            # Key of the cache entries' HMAC.
            {"name": "HERO_VISION_CACHE__SECRET",
             "valueFrom": {"secretKeyRef": {"name": "hero-cache-secret", "key": "secret"}}},
        ],
        "ports": [{"name": p, "containerPort": n} for p, n in ports],
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "readinessProbe": _probe(node, live=False),
        "livenessProbe": _probe(node, live=True),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": locked_down(),
        "volumeMounts": [{"name": "models", "mountPath": "/models"},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }


def _pod(container: dict[str, Any], node: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "hero-vision"}},
        "spec": {
            "terminationGracePeriodSeconds": PRESTOP_S + ray_drain_s() + POD_MARGIN_S,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "models", "emptyDir": {"sizeLimit": "40Gi"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": SHM[node]}}],
        },
    }


def rayservice() -> dict[str, Any]:
    # KubeRay builds the serve Service from the head container's ports named `serve` or
    # `serve-*` (HTTP 8000, gRPC 9000); a port named otherwise never reaches it.
    grpc_port = int(serve_config(gpu=False)["grpc_options"]["port"])
    serving = [("serve", SERVE_PORT), ("serve-grpc", grpc_port)]
    head = _container("ray-head", [("gcs", 6379), ("dashboard", 8265), ("client", 10001),
                                   *serving, ("metrics", 8080)], "1", "4Gi")
    worker = _container("ray-worker", [*serving, ("metrics", 8080)], "2", "8Gi")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "hero-vision", "labels": {"app.kubernetes.io/name": "hero-vision"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(gpu=False), sort_keys=False),
            # The public gRPC Service. KubeRay points it at the pods whose Serve proxy is
            # healthy in the cluster whose app is running, and switches it to the new
            # cluster only once that cluster serves (zero-downtime upgrades). Its ports are
            # the head container's serving ports (`serve`, `serve-*`); a port listed here
            # only replaces the one of the same name (so these names must match them).
            "serveService": {
                "metadata": {"name": "hero-vision-grpc",
                             "labels": {"app.kubernetes.io/name": "hero-vision"}},
                "spec": {"ports": [
                    {"name": "serve", "port": SERVE_PORT, "targetPort": SERVE_PORT},
                    {"name": "serve-grpc", "port": grpc_port, "targetPort": grpc_port,
                     "appProtocol": "kubernetes.io/h2c"},
                ]},
            },
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                # KubeRay adds the autoscaler as a sidecar of the head pod, locked down
                # like our containers.
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120,
                                      "securityContext": locked_down()},
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0",
                                       "metrics-export-port": "8080",
                                       "object-store-memory": str(OBJECT_STORE["head"])},
                    "template": _pod(head, "head"),
                },
                "workerGroupSpecs": [{
                    "groupName": "encoder",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": 4,
                    "rayStartParams": {"metrics-export-port": "8080",
                                       "object-store-memory": str(OBJECT_STORE["worker"])},
                    "template": _pod(worker, "worker"),
                }],
            },
        },
    }


def gpu_patch() -> list[dict[str, Any]]:
    """JSON 6902 patch of the gpu overlay: the GPU serveConfigV2."""
    return [{"op": "replace", "path": "/spec/serveConfigV2",
             "value": yaml.safe_dump(serve_config(gpu=True), sort_keys=False)}]


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


HEADER = ("# Generated by `python k8s/render.py` from services/vision/serve_config.yaml;"
          " edit those.\n")


def rendered() -> dict[Path, str]:
    return {
        RAYSERVICE: HEADER + dump(rayservice()),
        GPU_PATCH: HEADER + dump(gpu_patch()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = [path for path, text in rendered().items()
             if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run python k8s/render.py)")
        return 1 if stale else 0
    for path, text in rendered().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
