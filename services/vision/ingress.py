"""The ingress deployment: the public hero.vision.v1.VisionService behind Serve's gRPC proxy.

A thin adapter over `VisionPipeline` (`pipeline.py`), which does the work of every RPC:
this reads the call (the bearer token, then the metadata: the client's deadline),
passes the request through, and sets the status of whatever the pipeline raises
(`services.common.errors.status_for`, here and nowhere else). It also answers
`grpc.health.v1.Health/Check` on the public port (see `services.vision.api`), with the
token cache's state in the answer's trailing metadata (`cache_metadata`). It holds no
model: what the cache's entries must look like comes from the encoder deployment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2
from hero.vision.v1 import vision_pb2
from ray.serve.handle import DeploymentHandle

from services.common.errors import NotFoundError, public_details, status_for
from services.common.params import loggable_request_id
from services.vision.api import VISION_SERVICE, MalformedRequest
from services.vision.cache import CacheHealth
from services.vision.config import VisionConfig
from services.vision.door import deadline_of, metadata_pairs, parsed
from services.vision.drain import follow
from services.vision.encoder import RayEncoder
from services.vision.pipeline import HEALTH_CACHE_S, VisionPipeline
from services.vision.tokens import EncoderClient

__all__ = ["HEALTH_CACHE_S", "RequestFailed", "VisionIngress", "cache_metadata"]
log = logging.getLogger("hero.vision")
T = TypeVar("T")


def cache_metadata(health: CacheHealth) -> list[tuple[str, str]]:
    """Trailing metadata of a health answer: `hero-cache` is ok, unknown (not used yet)
    or degraded (requests are served as misses); while degraded, `hero-cache-reason`
    (tls, auth, connection, timeout, error) and `hero-cache-detail` say what failed."""
    if health.up is not False:
        return [("hero-cache", "ok" if health.up else "unknown")]
    detail = health.summary.encode("ascii", "replace").decode()[:200]
    return [("hero-cache", "degraded"), ("hero-cache-reason", health.reason),
            ("hero-cache-detail", detail)]


class ServiceNotFoundError(NotFoundError):
    """A health check for a service this server does not have."""


class RequestFailed(Exception):
    """What an RPC raises once its status is set: code and public details only."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, self.details)


class VisionIngress:
    """The public RPCs over `VisionPipeline`; no model weights."""

    def __init__(self, encoder: DeploymentHandle[Any] | EncoderClient, config: dict[str, Any]):
        """`encoder`: the encoder deployment's handle (or, in tests, any `EncoderClient`)."""
        self.config = VisionConfig.load(values=config)
        self.auth = self.config.bearer_tokens()  # none: refuses to start, unless allowed
        self.config.require_cache_secret()
        client = RayEncoder(encoder) if isinstance(encoder, DeploymentHandle) else encoder
        self.pipeline = VisionPipeline.build(self.config, client)
        self.metrics, self.source = self.pipeline.metrics, self.pipeline.tokens
        self.cache, self.language = self.source.cache, self.pipeline.language
        self.cache_checked = _in_running_loop(self.cache.check())
        """The startup check of the cache (a failure is logged at ERROR and the service
        serves misses); None when constructed outside an event loop."""
        self.drain = self.pipeline.drain
        self._drain_follower = follow(self.drain)  # the runner's drain, where it has one

    def _admit(self, grpc_context: Any) -> float | None:
        """Require `authorization: Bearer <token>` when tokens are configured, then read
        the metadata the service uses: the client's deadline (`time.monotonic()`)."""
        metadata = metadata_pairs(grpc_context)
        self.auth.check(metadata)
        return deadline_of(metadata)

    async def Generate(self, request: vision_pb2.GenerateRequest | MalformedRequest,
                       grpc_context: Any = None) -> AsyncIterator[vision_pb2.GenerateEvent]:
        request_id = loggable_request_id(getattr(request, "request_id", ""))
        try:
            deadline = self._admit(grpc_context)
            async for event in self.pipeline.generate(parsed(request), deadline=deadline,
                                                      request_id=request_id):
                yield event
            self.metrics.requests.inc(1, tags={"rpc": "Generate", "code": "OK"})
        except Exception as exc:
            raise self._fail(exc, request_id, "Generate", grpc_context) from exc

    async def Prune(self, request: vision_pb2.PruneRequest | MalformedRequest,
                    grpc_context: Any = None) -> AsyncIterator[vision_pb2.PruneResponse]:
        request_id = loggable_request_id(getattr(request, "request_id", ""))
        try:
            deadline = self._admit(grpc_context)
            async for response in self.pipeline.prune(parsed(request), deadline=deadline,
                                                      request_id=request_id):
                yield response
            self.metrics.requests.inc(1, tags={"rpc": "Prune", "code": "OK"})
        except Exception as exc:
            raise self._fail(exc, request_id, "Prune", grpc_context) from exc

    async def Check(self, request: health_pb2.HealthCheckRequest | MalformedRequest,
                    grpc_context: Any = None) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING while the language service answers and the service is
        not draining, else NOT_SERVING. The service name is "" (the whole server) or
        hero.vision.v1.VisionService. The token cache's state rides in the trailing
        metadata (`cache_metadata`): a degraded cache is reported, never NOT_SERVING,
        since misses still serve."""
        try:
            request = parsed(request)
            if request.service not in ("", VISION_SERVICE):
                raise ServiceNotFoundError(f"unknown service {request.service[:100]!r}; ask "
                                           f"for '' or {VISION_SERVICE}")
            serving, cache = await self.pipeline.health()
            if grpc_context is not None:
                grpc_context.set_trailing_metadata(cache_metadata(cache))
        except Exception as exc:
            raise self._fail(exc, "health", "Check", grpc_context) from exc
        serving = serving and not self.drain.draining
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING
                                              if serving else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check_health(self) -> None:
        """Ray Serve's periodic replica check. It asks the token cache whether it answers,
        so its gauge and log follow Redis without traffic, and never fails for it: a
        cache outage is a miss, not a reason to restart the replica."""
        try:
            await self.cache.check(max_age_s=HEALTH_CACHE_S)
        except Exception:
            log.exception("token cache check failed")

    def _fail(self, exc: BaseException, request_id: str, rpc: str,
              grpc_context: Any) -> RequestFailed:
        """Count the failure, set its status on the call, and return what to raise: a plain
        `RequestFailed` (Ray pickles it to the proxy; the status set here is what the
        client gets)."""
        code, message = status_for(exc, request_id)
        self.metrics.requests.inc(1, tags={"rpc": rpc, "code": code.name})
        details = public_details(message)
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(details)
        return RequestFailed(code, details)


def _in_running_loop(work: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """`work` as a task of the running event loop (Ray Serve constructs a replica's
    deployment object in it), or None, and `work` discarded, outside one."""
    try:
        return asyncio.get_running_loop().create_task(work)
    except RuntimeError:
        work.close()
        return None
