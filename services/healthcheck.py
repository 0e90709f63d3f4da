"""Container health check: exit 0 when the service at TARGET is serving.

    python -m services.healthcheck 127.0.0.1:50052          # grpc.health.v1 (language)
    python -m services.healthcheck 127.0.0.1:9000 --serve   # Ray Serve's gRPC proxy (vision)
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVE_HEALTHZ = "/ray.serve.RayServeAPIService/Healthz"


def serving(target: str, serve: bool, service: str, timeout_s: float) -> bool:
    with grpc.insecure_channel(target) as channel:
        if serve:  # Serve answers Healthz once its proxy and applications are up
            call = channel.unary_unary(SERVE_HEALTHZ, request_serializer=lambda _: b"",
                                       response_deserializer=lambda raw: raw)
            call(None, timeout=timeout_s)
            return True
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service),
                            timeout=timeout_s).status
        return status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port")
    parser.add_argument("--serve", action="store_true", help="check Ray Serve's proxy")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    try:
        ok = serving(args.target, args.serve, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    print("serving" if ok else "not serving")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
