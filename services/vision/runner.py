"""Run the vision app on a single-node Ray, from a Serve config, with Ray's public API.

Used by the container's entry point (`python -m services.vision`) and by `hero serve` /
the tests (`services.local`). On a Ray cluster, KubeRay's RayService deploys the same
config (`serveConfigV2`) itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "services" / "vision" / "serve_config.yaml"


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in `os.environ` inside the block; after it, the environment exactly as it
    was before (what the block added, `ray.init`'s own variables included, is gone).

    Ray's processes (GCS, raylet, and the workers the raylet forks later) copy the
    environment when `ray.init` starts them, so the vision service's variables reach every
    replica without staying behind in the caller (a test session, `hero serve`)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class ServeApp:
    """A local Ray (no dashboard) running the vision app of `config` (a Serve config:
    proxy, HTTP and gRPC options, one application).

    `node_ip`: the address Ray registers the node under, 127.0.0.1 by default; None lets
    Ray pick this host's outward address. Ray's dashboard agent binds the metrics export
    port to the node's address when that is a loopback one and to every interface
    otherwise, so a container whose metrics another container scrapes needs None."""

    def __init__(self, config: dict[str, Any], num_cpus: int | None = None,
                 metrics_export_port: int | None = None, node_ip: str | None = "127.0.0.1",
                 env: Mapping[str, str] | None = None):
        self.config = config
        self.num_cpus = num_cpus
        self.metrics_export_port = metrics_export_port
        self.node_ip = node_ip
        self.env = dict(env or {})
        """`HERO_VISION_*` variables for the app's replicas (secrets, overrides): they reach
        Ray's processes, not this one's environment."""
        self.drain_signal: Any = None
        """The `services.vision.drain.DrainSignal` actor the ingress replicas follow."""

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.config['grpc_options']['port']}"

    def start(self, timeout_s: float = 300) -> ServeApp:
        from ray.serve.schema import ServeDeploySchema

        from services.vision.app import build_app
        from services.vision.config import VisionConfig
        from services.vision.drain import RUNNER_ENV

        schema = ServeDeploySchema.model_validate(self.config)
        (app,) = schema.applications
        with environment(self.env):
            # The app's args are checked (values, API tokens) before Ray starts.
            deployments = [d.model_dump(exclude_unset=True) for d in app.deployments]
            application = build_app(app.args, deployments)
            # Serve's proxy reads its message bound (and its drain period) from the
            # environment when it starts.
            env = {**self.env, **VisionConfig.load(values=app.args).proxy_env(), **RUNNER_ENV}
        with environment(env):
            self._deploy(schema, application, env)
        deadline = time.monotonic() + timeout_s
        while not self.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"vision service not running after {timeout_s:.0f} s")
            time.sleep(0.2)
        return self

    def _deploy(self, schema: Any, application: Any, env: dict[str, str]) -> None:
        import ray
        from ray import serve

        from services.vision.drain import create_signal

        (app,) = schema.applications
        ray.init(num_cpus=self.num_cpus, include_dashboard=False, namespace="serve",
                 _node_ip_address=self.node_ip, log_to_driver=False,
                 _metrics_export_port=self.metrics_export_port,
                 runtime_env={"working_dir": None,
                              "env_vars": {"PYTHONPATH": str(ROOT), **env}},
                 ignore_reinit_error=True)
        self.drain_signal = create_signal()  # before the replicas, which look it up
        serve.start(proxy_location=schema.proxy_location,
                    http_options=schema.http_options.model_dump(),
                    grpc_options=schema.grpc_options.model_dump())
        # The config's deployment settings, as `serve run` and KubeRay apply them.
        serve.run(application, name=app.name, route_prefix=app.route_prefix, blocking=False)

    def running(self) -> bool:
        """Whether the app runs; `RuntimeError` when it failed to deploy."""
        from ray import serve

        status = serve.status().applications.get(self.config["applications"][0]["name"])
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"vision app failed to deploy: {status.message}")
        return status is not None and status.status == "RUNNING"

    def drain(self, grace_s: float | None = None, hurry: threading.Event | None = None
              ) -> bool:
        """Drain the app before `stop()`: refuse new calls (UNAVAILABLE) and report
        NOT_SERVING, let running calls finish within `grace_s` (default: the VisionIngress
        deployment's `graceful_shutdown_timeout_s`) or until `hurry` is set, then end the
        rest with UNAVAILABLE. Whether every call ended within the grace."""
        from services.vision.drain import drain_app, ingress_grace_s

        if self.drain_signal is None:
            return True
        grace = ingress_grace_s(self.config) if grace_s is None else grace_s
        try:
            return drain_app(self.drain_signal, grace, hurry)
        except Exception:  # Ray or Serve already gone: nothing left to drain
            logging.getLogger("hero.vision").warning("drain failed; stopping without it",
                                                     exc_info=True)
            return False

    def stop(self) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        self.drain_signal = None
