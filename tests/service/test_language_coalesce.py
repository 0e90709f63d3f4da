"""The language service coalesces its text deltas (`stream_coalesce`, `stream_interval_ms`):
a coalesced answer says exactly what the uncoalesced one says (text, token ids, usage,
stop strings honoured), in fewer messages when deltas pile up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from hero.common.v1 import tensor_pb2 as common_pb2

from loadtest.micro.relay_standin import FloodEngine
from services.language.app import build_engine
from services.language.decoding import Delta
from services.language.engine import EngineRequest, Finished
from services.sdk.language import SyncLanguageClient
from tests.service.conftest import ServerThread, language_config, language_server

QUESTION = "What is the astronaut holding?"
BURST = 20


def answer(server, packed, **params) -> tuple[str, list[int], common_pb2.Usage, int]:
    """(text, token ids, usage, delta messages) of one call."""
    client = SyncLanguageClient(f"127.0.0.1:{server.port}")
    try:
        parts = client.generate(packed, QUESTION, dtype="float32", **params)
    finally:
        client.close()
    deltas = [p for p in parts if isinstance(p, common_pb2.TextDelta)]
    assert isinstance(parts[-1], common_pb2.Usage)
    return ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
            parts[-1], len(deltas))


def test_coalesced_answers_equal_uncoalesced_ones_stop_strings_included(
        language_model, astronaut_tokens):
    plain = language_server(language_model, stream_coalesce=False)
    merged = language_server(language_model, stream_interval_ms=30.0)
    try:
        text = answer(plain, astronaut_tokens, max_new_tokens=24, seed=0)[0]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert stop.strip(), f"no stop string to cut {text!r} with"
        for params in ({"max_new_tokens": 24, "seed": 0},
                       {"max_new_tokens": 24, "seed": 0, "stop": [stop]}):
            want, got = answer(plain, astronaut_tokens, **params), \
                answer(merged, astronaut_tokens, **params)
            assert got[:2] == want[:2]
            assert (got[2].completion_tokens, got[2].finish_reason, got[2].prompt_tokens) == \
                (want[2].completion_tokens, want[2].finish_reason, want[2].prompt_tokens)
            assert got[3] <= want[3]
        assert stop not in want[0] and want[2].finish_reason == common_pb2.FINISH_REASON_STOP
    finally:
        plain.stop()
        merged.stop()


class BurstEngine(FloodEngine):
    """The real engine's checks; every answer is `BURST` one-token deltas made at once."""

    async def stream(self, request: EngineRequest, deadline: float | None = None
                     ) -> AsyncIterator[Delta | Finished]:
        for i in range(BURST):
            yield Delta(f"w{i} ", [10 + i])
        await asyncio.sleep(0.05)
        yield Finished(7, 3, BURST, 1.0, time.perf_counter(), 100.0, "length")


@pytest.mark.parametrize("coalesce", [False, True])
def test_a_burst_of_deltas_leaves_in_few_messages_only_when_coalescing(
        language_model, astronaut_tokens, coalesce):
    config = language_config(stream_coalesce=coalesce, stream_interval_ms=500.0)
    server = ServerThread(config, lambda: BurstEngine(build_engine(config, language_model)))
    try:
        text, ids, usage, messages = answer(server.ready(), astronaut_tokens)
    finally:
        server.stop()
    assert text == "".join(f"w{i} " for i in range(BURST))
    assert ids == [10 + i for i in range(BURST)]
    assert usage.completion_tokens == BURST
    assert messages <= 2 if coalesce else messages == BURST
