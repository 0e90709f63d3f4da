"""A draining vision ingress, without Ray: it refuses new calls with UNAVAILABLE, reads
NOT_SERVING, and ends an answer that outlives the grace with UNAVAILABLE."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.sdk.vision import generate_request, prune_request
from services.vision.drain import REFUSAL
from services.vision.ingress import RequestFailed
from tests.service.conftest import language_server
from tests.service.test_vision_endpoint import call, run
from tests.service.vision_harness import Context, png_bytes


async def until(condition, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_draining_ingress_refuses_new_calls_and_ends_what_outlives_the_grace(
        encoder_object, redis_url, language_model):
    language = language_server(language_model, limits={"max_new_tokens": 4096})

    async def scenario(ingress, encoder):
        image = png_bytes(301)
        running, events = Context(), []

        async def answer():
            async for event in ingress.Generate(generate_request(
                    image, "Describe it.", max_new_tokens=4000, ignore_eos=True), running):
                events.append(event)

        task = asyncio.create_task(answer())
        await until(lambda: any(e.WhichOneof("event") == "delta" for e in events))
        ingress.drain.begin()
        health = await ingress.Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        refused, context = await call(ingress, generate_request(image, "Hi", max_new_tokens=2))
        assert not refused and context.code_set == grpc.StatusCode.UNAVAILABLE
        assert context.details_set == REFUSAL
        pruned = Context()
        with pytest.raises(RequestFailed, match="UNAVAILABLE"):
            async for _ in ingress.Prune(prune_request(image, "Hi"), pruned):
                pass
        assert pruned.details_set == REFUSAL
        assert not task.done() and ingress.drain.in_flight == 1

        ingress.drain.expire("the grace is over; retry")
        with pytest.raises(RequestFailed):
            await task
        assert running.code_set == grpc.StatusCode.UNAVAILABLE
        assert running.details_set == "the grace is over; retry"
        assert events[0].WhichOneof("event") == "accepted"
        assert not any(e.WhichOneof("event") == "usage" for e in events)
        assert ingress.drain.in_flight == 0

    try:
        run(scenario, encoder_object, redis_url, language_target=f"127.0.0.1:{language.port}")
    finally:
        language.stop()
