"""Run the vision service on a single-node Ray (a container, a VM).

    python -m services.vision [--serve-config services/vision/serve_config.yaml]

Application args come from the Serve config; environment variables `HERO_VISION_<KEY>`
override them (nested keys with `__`, e.g. `HERO_VISION_CACHE__URL`), and
`HERO_VISION_GRPC_PORT` sets the gRPC port and `HERO_VISION_METRICS_PORT` the port
where Ray exports the Prometheus metrics. On a Ray cluster use KubeRay's RayService
or `serve deploy` with the same file instead. SIGTERM shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from services.common.config import env_overrides, merge
from services.vision.config import VisionConfig
from services.vision.runner import SERVE_CONFIG, ServeApp

ENV_PREFIX = "HERO_VISION_"


def resolve_config(path: Path, environ: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    app = config["applications"][0]
    args = merge(app.get("args", {}), env_overrides(VisionConfig, ENV_PREFIX, environ))
    app["args"] = VisionConfig.model_validate(args).model_dump(mode="json")
    if f"{ENV_PREFIX}GRPC_PORT" in environ:
        config["grpc_options"]["port"] = int(environ[f"{ENV_PREFIX}GRPC_PORT"])
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description="HERO Serve vision service (single node)")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    metrics_port = os.environ.get(f"{ENV_PREFIX}METRICS_PORT")
    app = ServeApp(resolve_config(args.serve_config, dict(os.environ)),
                   metrics_export_port=int(metrics_port) if metrics_port else None).start()
    print(f"vision service ready on port {app.config['grpc_options']['port']}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    app.stop()


if __name__ == "__main__":
    main()
