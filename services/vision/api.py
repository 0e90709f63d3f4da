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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service,
                                                                              handlers),))
