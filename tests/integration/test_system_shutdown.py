"""Stopping the system drains the vision app first, as `python -m services.vision` and
`hero serve` do on SIGTERM: answers streaming through Serve finish and reach the client
before Serve stops, new calls get a retryable UNAVAILABLE and health reads NOT_SERVING,
and an answer the drain has to end gets UNAVAILABLE, not a cut stream. It stops the
session's system, so it runs after the other integration tests (`conftest.py` orders it
last)."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2
from hero.common.v1 import tensor_pb2 as common_pb2

from services.local import wait_for
from services.sdk.vision import call_metadata, generate_request
from tests.integration.conftest import png
from tests.integration.test_system import Q1, health_status, run

SHORT, LONG = 1000, 4096
"""Tokens of an answer that ends within the drain, and of one the drain ends."""


class Answer(threading.Thread):
    """A Generate call through the public port, read in the background."""

    def __init__(self, client, data: bytes, max_new_tokens: int):
        super().__init__(daemon=True)
        request = generate_request(data, Q1, max_new_tokens=max_new_tokens, ignore_eos=True)
        self.call = client.stub.Generate(request, timeout=120,
                                         metadata=call_metadata(client.metadata, 120))
        self.events: list = []
        self.streaming = threading.Event()
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
                if event.WhichOneof("event") == "delta":
                    self.streaming.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.streaming.set()

    def tokens(self) -> int:
        return sum(len(e.delta.token_ids) for e in self.events if e.WhichOneof("event") == "delta")


def test_a_drain_delivers_running_answers_refuses_new_calls_and_ends_the_rest(system, client,
                                                                              photo):
    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)  # cached: both answers start streaming at once
    short, long = Answer(client, data, SHORT), Answer(client, data, LONG)
    assert short.streaming.wait(60) and long.streaming.wait(60), (short.error, long.error)
    hurry, outcome = threading.Event(), []

    def stop() -> None:  # what the runner does on SIGTERM (and on a second one: hurry)
        outcome.append(system.app.drain(60, hurry))
        system.app.stop()
        system.app = None

    stopper = threading.Thread(target=stop)
    stopper.start()
    wait_for(lambda: health_status(system.target) == health_pb2.HealthCheckResponse.NOT_SERVING,
             5, "NOT_SERVING while draining")
    refused = Answer(client, data, 4)
    refused.join(30)
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down (draining); retry" in refused.error.details()

    short.join(60)  # complete, while the long answer keeps the drain going
    assert short.error is None, short.error.details()
    usage = short.events[-1].usage.language
    assert usage.completion_tokens == short.tokens() == SHORT
    assert usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert long.is_alive() and stopper.is_alive()

    hurry.set()  # end the drain now: the long answer gets UNAVAILABLE, then Serve stops
    long.join(60)
    stopper.join(60)
    assert outcome == [False] and system.app is None
    assert long.error is not None and long.error.code() == grpc.StatusCode.UNAVAILABLE, \
        long.error.details()
    assert "the vision service was told to stop at once; retry" in long.error.details()
    assert 0 < long.tokens() < LONG
