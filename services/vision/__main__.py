"""Run the vision service on a single-node Ray (a container, a VM).

    python -m services.vision [--serve-config services/vision/serve_config.yaml]

Application args come from the Serve config; environment variables `HERO_VISION_<KEY>`
override them in every process that loads them (nested keys with `__`, e.g.
`HERO_VISION_CACHE__URL`; see `services.vision.config`). `HERO_VISION_GRPC_PORT` sets
the gRPC port, `HERO_VISION_METRICS_PORT` the port where Ray exports the Prometheus
metrics and `HERO_VISION_NODE_IP` the node's address (`auto` in a container, so that
other containers reach the metrics port; `NodeSettings`). On a Ray cluster use KubeRay's
RayService or `serve deploy` with the same file instead. SIGTERM (or SIGINT) drains the
app first: new calls get UNAVAILABLE and health NOT_SERVING while running answers finish,
within the VisionIngress deployment's `graceful_shutdown_timeout_s` (a second signal ends
the drain at once); then Serve and Ray shut down.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings
from services.vision.config import ENV_PREFIX
from services.vision.runner import SERVE_CONFIG, ServeApp


class NodeSettings(ServiceSettings):
    """The single-node runner's own settings, beside the application's args."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    grpc_port: int | None = Field(None, ge=0, le=65535)
    """Serve's gRPC port; None: the Serve config's."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Where Ray exports the Prometheus metrics; None: a port of Ray's choosing."""
    node_ip: str = "127.0.0.1"
    """The address Ray registers this node under. Ray binds the metrics port to it when it
    is a loopback address, else to every interface: `auto` (this host's outward address,
    Ray's choice) in a container whose metrics Prometheus scrapes from another one."""

    def ray_node_ip(self) -> str | None:
        """`node_ip` as `ServeApp` takes it (None: Ray picks)."""
        return None if self.node_ip == "auto" else self.node_ip


def resolve_config(path: Path, node: NodeSettings) -> dict[str, Any]:
    """The Serve config at `path` with the node's settings (its app args are checked,
    with this environment over them, by `ServeApp.start` before Ray starts)."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    if node.grpc_port is not None:
        config["grpc_options"]["port"] = node.grpc_port
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description="HERO Serve vision service (single node)")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    node = NodeSettings()
    app = ServeApp(resolve_config(args.serve_config, node), metrics_export_port=node.metrics_port,
                   node_ip=node.ray_node_ip()).start()
    print(f"vision service ready on port {app.config['grpc_options']['port']}", flush=True)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_: Any) -> None:  # the first signal drains; a second one hurries it
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    stop.wait()
    logging.getLogger("hero.vision").info("draining before shutting down")
    app.drain(hurry=hurry)
    app.stop()


if __name__ == "__main__":
    main()
