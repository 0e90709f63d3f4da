"""Container health check: exit 0 when the service at TARGET is serving.

    python -m services.healthcheck 127.0.0.1:50052          # grpc.health.v1 (language)
    python -m services.healthcheck 127.0.0.1:9000 --serve   # Ray Serve's gRPC proxy (vision)
    python -m services.healthcheck --ray-node head          # a KubeRay pod's own checks
    python -m services.healthcheck --ray-node worker --live

A vision service's answer also carries its token cache's state; a degraded cache (every
request served as a miss) is printed with its cause, and is not a failure:

    serving (cache degraded, tls: Redis TLS certificate does not match the host name ...)

`--ray-node` runs the checks KubeRay's default probes run with `wget` (which our images
do not have), with the standard library: the raylet through the dashboard agent, the
GCS on the head, and on workers the Serve proxy (readiness only, as KubeRay does).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVE_HEALTHZ = "/ray.serve.RayServeAPIService/Healthz"


def serving(target: str, serve: bool, service: str, timeout_s: float) -> tuple[bool, str]:
    """Whether the service at `target` serves, and a note on its cache when degraded."""
    with grpc.insecure_channel(target) as channel:
        if serve:  # Serve answers Healthz once its proxy and applications are up
            call = channel.unary_unary(SERVE_HEALTHZ, request_serializer=lambda _: b"",
                                       response_deserializer=lambda raw: raw)
            call(None, timeout=timeout_s)
            return True, ""
        stub = health_pb2_grpc.HealthStub(channel)
        response, answer = stub.Check.with_call(health_pb2.HealthCheckRequest(service=service),
                                                timeout=timeout_s)
        return (response.status == health_pb2.HealthCheckResponse.SERVING,
                cache_note(dict(answer.trailing_metadata() or ())))


def cache_note(metadata: dict[str, str]) -> str:
    """What follows "serving" when a vision health answer's trailing metadata says its
    cache is degraded (` (cache degraded, REASON: DETAIL)`); else nothing."""
    if metadata.get("hero-cache") != "degraded":
        return ""
    return (f" (cache degraded, {metadata.get('hero-cache-reason', '?')}: "
            f"{metadata.get('hero-cache-detail', '')})")


RAYLET = "api/local_raylet_healthz"
GCS = "api/gcs_healthz"
SERVE_HTTP = "-/healthz"


def ray_checks(node: str, live: bool, agent_port: int, dashboard_port: int,
               serve_port: int) -> list[str]:
    """The URLs KubeRay's default probes check on a `head` or `worker` pod."""
    urls = [f"http://localhost:{agent_port}/{RAYLET}"]
    if node == "head":
        urls.append(f"http://localhost:{dashboard_port}/{GCS}")
    elif not live:  # a worker is ready once its Serve proxy answers
        urls.append(f"http://localhost:{serve_port}/{SERVE_HTTP}")
    return urls


def ray_healthy(urls: list[str], timeout_s: float) -> bool:
    """True when every URL answers 2xx with "success" in its body."""
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if b"success" not in response.read(4096):
                    print(f"unhealthy: {url} did not report success", file=sys.stderr)
                    return False
        except (urllib.error.URLError, OSError) as exc:
            print(f"unhealthy: {url}: {exc}", file=sys.stderr)
            return False
    return True


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="host:port of a gRPC service")
    parser.add_argument("--serve", action="store_true", help="check Ray Serve's proxy")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name")
    parser.add_argument("--ray-node", choices=("head", "worker"),
                        help="check this Ray pod as KubeRay's default probes do")
    parser.add_argument("--live", action="store_true",
                        help="with --ray-node: liveness (no Serve proxy check)")
    parser.add_argument("--agent-port", type=int, default=52365)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=3.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.ray_node:
        urls = ray_checks(args.ray_node, args.live, args.agent_port, args.dashboard_port,
                          args.serve_port)
        return 0 if ray_healthy(urls, args.timeout) else 1
    if not args.target:
        parser().error("give a TARGET or --ray-node")
    try:
        ok, note = serving(args.target, args.serve, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    print(("serving" if ok else "not serving") + note)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
