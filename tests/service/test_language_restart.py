"""A language service that restarts on the same address: the vision ingress answers
the first request after it is back, however long it was down (gRPC's reconnect backoff
would otherwise keep the channel failing for up to two minutes)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.local import free_port
from services.sdk.vision import generate_request
from tests.service.conftest import language_server
from tests.service.test_vision_endpoint import call, run
from tests.service.vision_harness import png_bytes


@pytest.mark.parametrize("image_seed", [311, 312], ids=["cached image", "new image"])
def test_the_first_request_after_the_language_service_returns_is_answered(
        encoder_object, redis_url, language_model, image_seed):
    """A cached image goes straight to the answer; a new one is validated with the
    language service before it is encoded: both calls wait for the reconnection."""
    port = free_port()
    language = language_server(language_model, port=port)

    async def scenario(ingress, encoder):
        def ask(seed: int = 311):
            return call(ingress, generate_request(png_bytes(seed), "What is it?",
                                                  max_new_tokens=2))

        events, context = await ask()
        assert context.code_set is None and events[-1].WhichOneof("event") == "usage"
        await asyncio.to_thread(language.stop)

        # Down for 6 s while requests keep coming: each fails UNAVAILABLE, and the
        # channel's reconnect attempts back off further apart.
        down_until = time.monotonic() + 6
        while time.monotonic() < down_until:
            events, context = await ask()
            assert context.code_set == grpc.StatusCode.UNAVAILABLE, context.details_set
            await asyncio.sleep(0.5)

        back = await asyncio.to_thread(language_server, language_model, port=port)
        try:
            events, context = await ask(image_seed)
        finally:
            await asyncio.to_thread(back.stop)
        assert context.code_set is None, context.details_set
        assert [e.WhichOneof("event") for e in events][-1] == "usage"

    try:
        run(scenario, encoder_object, redis_url, language_target=f"127.0.0.1:{port}",
            language_retries=2)
    finally:
        language.stop()
