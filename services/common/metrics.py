"""Prometheus metrics: each service owns a registry and serves it on its own port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Expose `registry` on http://host:port/metrics; port 0 turns it off. Returns the port."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
