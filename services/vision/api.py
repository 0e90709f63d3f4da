"""The services on the public gRPC port, as Serve's proxy registers them.

`serve_config.yaml` names `add_public_services` in `grpc_options.grpc_servicer_functions`.
It registers, for the ingress deployment to answer:

* `hero.vision.v1.VisionService` (Generate, Prune), like the generated
  `add_VisionServiceServicer_to_server` except for one thing: request bytes that do not
  parse become a `MalformedRequest`, which the ingress answers INVALID_ARGUMENT. (The
  proxy parses requests itself; a parse error there is UNKNOWN "Unexpected <class ...>".)
* `grpc.health.v1.Health/Check`, so load balancers and `grpc_health_probe` can ask the
  public port whether it can answer (NOT_SERVING while the language service is
  unreachable).

Serve's proxy replaces each method's behaviour with its own (an async generator that
forwards the call to a replica) and keeps the rest of the handler. Its generator cancels
the replica's work only when the cancel of a call lands while it waits for the replica;
a cancel that lands while grpc writes a message to the client leaves the generator
suspended, and the replica (and its language call) runs on for nobody. So the streaming
methods are served by `relay`: the proxy's generator runs in a task of its own that only
ever waits for the replica, and however the call ends, that task is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hero.vision.v1 import vision_pb2

VISION_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclasses.dataclass
class MalformedRequest:
    """Stands in for a request whose bytes are not a valid message of its type."""

    message_type: str
    size: int

    def problem(self) -> str:
        return (f"the request ({self.size} bytes) is not a valid {self.message_type}; "
                "serialise it with this service's .proto files")


def lenient(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that yields `MalformedRequest` instead of raising."""
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            return MalformedRequest(message.DESCRIPTOR.full_name, len(data))
    return parse


_PUMPS: set[asyncio.Task[None]] = set()
"""Relay tasks still running (the event loop keeps only weak references to tasks)."""


async def _pump(messages: AsyncIterator[Any], queue: asyncio.Queue[tuple[Any, bool]]) -> None:
    """Move `messages` into `queue` as (message, False), then (what ended them: None or
    an exception, True). Waits on nothing but `messages`, so a cancel lands there."""
    try:
        async for message in messages:
            queue.put_nowait((message, False))
    except BaseException as exc:  # passed on to the handler, which raises it
        queue.put_nowait((exc, True))
    else:
        queue.put_nowait((None, True))


def relay(stream: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], Any]:
    """A unary-stream handler that writes what `stream(request, context)` yields, reading
    it in a task of its own, and cancels that task when the call ends early (client
    cancel, deadline, broken connection): the cancel reaches `stream` where it waits,
    never at a `yield`. Messages are read ahead of slow writes, as the replica produces
    them anyway."""
    async def handler(request: Any, context: Any) -> None:
        queue: asyncio.Queue[tuple[Any, bool]] = asyncio.Queue()
        pump = asyncio.ensure_future(_pump(stream(request, context), queue))
        _PUMPS.add(pump)
        pump.add_done_callback(_PUMPS.discard)
        try:
            while True:
                item, last = await queue.get()
                if last:
                    if item is not None:
                        raise item
                    return
                await context.write(item)
        finally:
            pump.cancel()  # nothing when it has finished
    return handler


class RelayingHandler(grpc.GenericRpcHandler):
    """The handlers of one service, with its unary-stream methods served by `relay`.

    `_method_handlers` ("/service/Method" -> handler) is the attribute Serve's proxy reads
    and replaces with its own handlers (as it does for grpc's generic handler), so the
    relay wraps whichever handlers are there when a call arrives."""

    def __init__(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]):
        self._method_handlers = {f"/{service}/{name}": handler
                                 for name, handler in handlers.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        handler = self._method_handlers.get(handler_call_details.method)
        if handler is None or handler.request_streaming or not handler.response_streaming \
                or not inspect.isasyncgenfunction(handler.unary_stream):
            return handler
        return handler._replace(unary_stream=relay(handler.unary_stream))


def add_public_services(servicer: Any, server: Any) -> None:
    """Register the public services on `server` (Serve routes them to the ingress)."""
    vision = {
        name: grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name), request_deserializer=lenient(request),
            response_serializer=response.SerializeToString)
        for name, request, response in (
            ("Generate", vision_pb2.GenerateRequest, vision_pb2.GenerateEvent),
            ("Prune", vision_pb2.PruneRequest, vision_pb2.PruneResponse))}
    health = {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=lenient(health_pb2.HealthCheckRequest),
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}
    for service, handlers in ((VISION_SERVICE, vision), (HEALTH_SERVICE, health)):
        server.add_generic_rpc_handlers((RelayingHandler(service, handlers),))
