"""Coalescing streamed deltas (`services.common.coalesce`): lossless, never delays a
delta the writer could take (beyond the interval), merges what piles up behind a busy
writer, keeps errors after the items before them, and closes its source when closed."""

from __future__ import annotations

import asyncio
import time

import pytest
from hero.common.v1 import tensor_pb2 as common_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.coalesce import coalesce
from services.language.decoding import Delta
from services.language.engine import Finished
from services.language.server import merge_deltas
from services.vision.pipeline import merge_text_deltas

DONE = Finished(prompt_tokens=5, visual_tokens=3, completion_tokens=0, prefill_ms=1.0,
                first_token_at=0.0, decode_tokens_per_s=0.0, finish_reason="stop")


async def source(deltas: list[Delta], pauses: list[int] | None = None, end=DONE):
    """`deltas` then `end`; before delta i, `pauses[i]` turns of the event loop."""
    for i, delta in enumerate(deltas):
        for _ in range((pauses or [0] * len(deltas))[i]):
            await asyncio.sleep(0)
        yield delta
    yield end


def joined(items) -> tuple[str, list[int]]:
    deltas = [d for d in items if isinstance(d, Delta)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


def test_merge_is_concatenation_and_leaves_the_usage_alone():
    assert merge_deltas(Delta("ab", [1]), Delta("c", [2, 3])) == Delta("abc", [1, 2, 3])
    assert merge_deltas(Delta("ab", [1]), DONE) is None
    usage = common_pb2.Usage(completion_tokens=3)
    merged = merge_text_deltas(common_pb2.TextDelta(text="a", token_ids=[1]),
                               common_pb2.TextDelta(text="é", token_ids=[2, 3]))
    assert merged == common_pb2.TextDelta(text="aé", token_ids=[1, 2, 3])
    assert merge_text_deltas(common_pb2.TextDelta(text="a"), usage) is None


def test_a_backlog_behind_a_busy_writer_goes_out_as_one_message():
    deltas = [Delta(f"t{i} ", [i]) for i in range(20)]

    async def main():
        out = []
        async for item in coalesce(source(deltas, [0] + [1] * 19), merge_deltas):
            out.append(item)
            await asyncio.sleep(0.05)  # a slow writer: everything else arrives meanwhile
        return out

    out = asyncio.run(main())
    assert joined(out) == joined(deltas)
    assert out[0] == deltas[0]  # the first goes as soon as it comes
    assert len(out) == 3 and out[-1] is DONE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=3), st.lists(st.integers(0, 50_000), max_size=3),
                          st.integers(0, 3)), max_size=30),
       st.lists(st.integers(0, 3), max_size=30), st.sampled_from([0.0, 0.002]))
def test_coalesced_streams_say_exactly_what_the_source_said(parts, writer_pauses, interval):
    deltas = [Delta(text, ids) for text, ids, _ in parts]
    pauses = [p for _, _, p in parts]

    async def main():
        out = []
        async for item in coalesce(source(deltas, pauses), merge_deltas, interval):
            out.append(item)
            for _ in range(writer_pauses[len(out) % len(writer_pauses)] if writer_pauses
                           else 0):
                await asyncio.sleep(0)
        return out

    out = asyncio.run(main())
    assert joined(out) == joined(deltas)
    assert out[-1] is DONE and all(isinstance(d, Delta) for d in out[:-1])
    assert len(out) <= len(deltas) + 1
    if deltas:
        assert out[0].token_ids[:len(deltas[0].token_ids)] == deltas[0].token_ids


def test_a_free_writer_gets_every_delta_at_once_with_interval_zero():
    """The source waits for each delta to be taken before making the next: a coalescer
    that held a delta would never see the next one come."""
    taken = asyncio.Event

    async def main():
        got = taken()

        async def lockstep():
            for i in range(5):
                got.clear()
                yield Delta(str(i), [i])
                await asyncio.wait_for(got.wait(), 1.0)
            yield DONE

        out = []
        async for item in coalesce(lockstep(), merge_deltas):
            out.append(item)
            got.set()
        return out

    out = asyncio.run(main())
    assert [d.text for d in out[:-1]] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("interval", [0.05, 0.2])
def test_no_delta_is_held_longer_than_the_interval(interval):
    """The first delta goes at once; a later one waits for company at most `interval`
    while the writer is free, and then goes alone."""
    async def main():
        stamps: list[tuple[str, float]] = []
        released = asyncio.Event()

        async def slow():
            yield Delta("a", [1])
            await asyncio.sleep(0.02)  # "a" is taken alone meanwhile
            yield Delta("b", [2])
            stamps.append(("b made", time.monotonic()))
            await released.wait()  # nothing more until the writer has sent "b"
            yield DONE

        async for item in coalesce(slow(), merge_deltas, interval):
            stamps.append((getattr(item, "text", "done"), time.monotonic()))
            if "b" in getattr(item, "text", ""):
                released.set()
        return stamps

    stamps = dict(asyncio.run(main()))
    assert stamps["a"] <= stamps["b made"]
    held = stamps["b"] - stamps["b made"]
    assert interval * 0.8 <= held <= interval + 0.15


def test_the_interval_merges_what_comes_within_it_and_stops_at_the_usage():
    async def main():
        async def bursts():
            yield Delta("a", [1])
            await asyncio.sleep(0.01)
            yield Delta("b", [2])
            await asyncio.sleep(0.01)
            yield Delta("c", [3])
            yield DONE

        return [item async for item in coalesce(bursts(), merge_deltas, 0.5)]

    start = time.monotonic()
    out = asyncio.run(main())
    assert out == [Delta("a", [1]), Delta("bc", [2, 3]), DONE]
    assert time.monotonic() - start < 0.4  # the usage ended the wait


def test_an_error_comes_after_the_items_before_it():
    async def failing():
        yield Delta("a", [1])
        yield Delta("b", [2])
        raise RuntimeError("engine failed")

    async def main():
        out = []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for item in coalesce(failing(), merge_deltas):
                out.append(item)
                await asyncio.sleep(0.01)
        return out

    assert joined(asyncio.run(main())) == ("ab", [1, 2])


@pytest.mark.parametrize("interval", [0.0, 0.02])
def test_a_cancelled_error_the_source_raises_itself_reaches_the_writer(interval):
    """grpc.aio raises CancelledError out of a call it cancelled itself (its deadline
    passed while the request stream closed) although nobody cancelled the reader: the
    writer gets it after the items before it, instead of waiting for the reader forever."""
    async def self_cancelled():
        yield Delta("a", [1])
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    async def main():
        out = []

        async def drain():
            async for item in coalesce(self_cancelled(), merge_deltas, interval):
                out.append(item)

        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(drain())), 5)
        return out

    assert joined(asyncio.run(main())) == ("a", [1])


def test_closing_the_stream_closes_its_source():
    async def main():
        closed = asyncio.Event()

        async def endless():
            try:
                while True:
                    await asyncio.sleep(0)
                    yield Delta("x", [1])
            finally:
                closed.set()

        stream = coalesce(endless(), merge_deltas)
        await anext(stream)
        await stream.aclose()
        return closed.is_set()

    assert asyncio.run(main())


def test_a_negative_interval_is_refused():
    async def main():
        await anext(coalesce(source([]), merge_deltas, -1.0))

    with pytest.raises(ValueError):
        asyncio.run(main())
