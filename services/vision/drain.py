"""Draining the vision app before its single-node runner stops it.

`python -m services.vision`, `hero serve` and the tests run the app with `ServeApp`.
Serve's own shutdown kills its proxies at once, cutting every answer still streaming
through them, so the runner drains the app first, through `DrainSignal`: a Ray actor
it owns (`hero-vision-drain`), which every ingress replica follows. Once the runner
begins the drain, the replicas refuse new calls with UNAVAILABLE, answer health checks
NOT_SERVING and report the calls they still run; the runner waits until none runs, at
most its grace (the VisionIngress deployment's `graceful_shutdown_timeout_s`), then
ends the rest with UNAVAILABLE. A replica's answer is done before Serve's proxy has
delivered all of it (the proxy streams what the replica produced, at the client's pace),
so the runner also drains the proxies as Serve's controller drains a node's proxy: their
own health check fails and they report when no call is left in them. Only then does it
shut Serve down.

On a Ray cluster (KubeRay) there is no runner and no signal: a pod that stops drains
its Ray node (`RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`), Serve drains the node's proxy
and moves its replicas elsewhere, each finishing its calls within its
`graceful_shutdown_timeout_s` (see docs/DEPLOY.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from services.common.drain import Drain

log = logging.getLogger("hero.vision")
SIGNAL_NAME = "hero-vision-drain"
NAMESPACE = "serve"
REPORT_S = 0.25
"""How often a draining replica reports the calls it still runs."""
STALE_S = 10.0
"""A replica silent this long during a drain is gone (killed, or scaled down)."""
CLOSE_S = 10.0
"""After the grace: how long the calls ended with UNAVAILABLE get to report their end."""
REFUSAL = "the vision service is shutting down (draining); retry"
PROXY_PREFIX = "SERVE_PROXY_ACTOR"
"""Serve's proxy actors' names (in Serve's namespace) start with this."""
RUNNER_ENV = {"RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1"}
"""Environment of the runner's Ray: a drained proxy reports so after 1 s (Serve's default,
30 s, gives load balancers in front of a cluster node time to take it out)."""


class DrainSignal:
    """Run as a Ray actor by the runner: when to drain, and the replicas' calls meanwhile."""

    def __init__(self) -> None:
        self._begun = asyncio.Event()
        self._expired = asyncio.Event()
        self.begun_at = 0.0
        self.expiry = ""
        self.replicas: set[str] = set()
        self.reports: dict[str, tuple[int, float]] = {}
        """Replica -> (calls running, when reported), since the drain began."""

    def register(self, replica: str) -> None:
        self.replicas.add(replica)

    async def begun(self) -> None:
        await self._begun.wait()

    async def expired(self) -> str:
        await self._expired.wait()
        return self.expiry

    def begin(self) -> None:
        if not self._begun.is_set():
            self.begun_at = time.monotonic()
            self._begun.set()

    def expire(self, message: str) -> None:
        self.expiry = message
        self._expired.set()

    def report(self, replica: str, in_flight: int) -> None:
        self.reports[replica] = (in_flight, time.monotonic())

    def idle(self) -> bool:
        """Whether the drain began and no live replica runs a call. A replica that has
        not reported (or went silent) for `STALE_S` since it began is taken as gone."""
        if not self._begun.is_set():
            return False
        now = time.monotonic()
        if now - self.begun_at < STALE_S and not self.replicas <= self.reports.keys():
            return False
        return all(n == 0 or now - at >= STALE_S for n, at in self.reports.values())


def follow(drain: Drain) -> asyncio.Task[None] | None:
    """Make an ingress replica's `drain` follow the runner's signal; None where there is
    none (a Ray cluster without a runner), or outside a Serve replica (an ingress built in
    a test's process, which may run Ray for a local system of its own)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    try:
        signal = ray.get_actor(SIGNAL_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
    return loop.create_task(_follow(signal, drain, uuid.uuid4().hex))


async def _follow(signal: Any, drain: Drain, replica: str) -> None:
    try:
        await signal.register.remote(replica)
        await signal.begun.remote()
        drain.begin()
        log.info("draining: new calls are refused, %d still run", drain.in_flight)
        expired = asyncio.ensure_future(signal.expired.remote())
        while True:
            if expired.done() and not drain.expired:
                drain.expire(expired.result())
            await signal.report.remote(replica, drain.in_flight)
            if drain.in_flight == 0:  # nothing is admitted any more: done
                return
            await asyncio.wait((expired,), timeout=REPORT_S)
    except Exception:  # the runner is gone: its process ends this one too
        log.warning("lost the drain signal", exc_info=True)


def create_signal() -> Any:
    """The runner's signal actor (named, so the replicas find it; owned by the runner)."""
    actor = ray.remote(num_cpus=0)(DrainSignal)
    return actor.options(name=SIGNAL_NAME, namespace=NAMESPACE, get_if_exists=True).remote()


def serve_proxies() -> list[Any]:
    """Handles of Serve's proxy actors (one per node with replicas, and the head's)."""
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(PROXY_PREFIX)]


def drain_app(signal: Any, grace_s: float, hurry: threading.Event | None = None) -> bool:
    """Begin the drain and wait until no call runs in a replica or a proxy, at most
    `grace_s` (or until `hurry` is set); then end the calls still running with
    UNAVAILABLE and wait for them to be delivered. Whether every call ended within the
    grace."""
    ray.get(signal.begin.remote())
    proxies = serve_proxies()
    ray.get([proxy.update_draining.remote(True) for proxy in proxies])

    def drained() -> bool:
        return bool(ray.get(signal.idle.remote())) and all(
            ray.get([proxy.is_drained.remote() for proxy in proxies]))

    if _wait(drained, grace_s, hurry):
        return True
    log.warning("calls still running after the drain: ending them (UNAVAILABLE)")
    ray.get(signal.expire.remote(
        "the vision service was told to stop at once; retry"
        if hurry is not None and hurry.is_set() else
        f"the vision service is shutting down: this call ran past its {grace_s:g} s "
        "drain; retry"))
    _wait(drained, CLOSE_S)
    return False


def _wait(condition: Callable[[], bool], timeout_s: float,
          hurry: threading.Event | None = None) -> bool:
    """Poll `condition()` until it holds (True), `timeout_s` passes or `hurry` is set."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            return False
        time.sleep(REPORT_S)
    return True


SERVE_DEFAULT_GRACE_S = 20.0
"""Serve's `graceful_shutdown_timeout_s` where a deployment does not set one."""


def ingress_grace_s(config: dict[str, Any]) -> float:
    """The drain's grace: the VisionIngress deployment's `graceful_shutdown_timeout_s` in
    the Serve config `config`, the bound Serve itself puts on a replica's calls when it
    stops one."""
    for deployment in config["applications"][0].get("deployments", []):
        if deployment["name"] == "VisionIngress":
            return float(deployment.get("graceful_shutdown_timeout_s",
                                        SERVE_DEFAULT_GRACE_S))
    return SERVE_DEFAULT_GRACE_S
