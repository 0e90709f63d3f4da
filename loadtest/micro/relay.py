"""The relay: tokens/s through the whole system against the engine's own, and the
relay's ceiling, with delta coalescing off and on.

Every generated token travels language engine -> language service -> vision pipeline ->
Serve gRPC proxy -> client. For 1, 8 and 32 concurrent clients (each its own channel,
closed loop, cache hits, `MAX_NEW_TOKENS` tokens each past end of sequence) it measures,
side by side in one run:

* the batched engine alone (in process, the tiny LM, no service around it);
* the whole system (`LocalSystem`: Redis, the language service with the tiny LM, the
  vision app on Ray Serve), coalescing off and on;
* the relay's ceiling: the same system with a language service whose engine costs
  nothing (`relay_standin`: one-token deltas as fast as they are taken).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2, vision_pb2_grpc

from hero_core.models import resolve_spec
from loadtest.micro.batching import packed_tokens
from loadtest.runner import photo_variant
from loadtest.stats import percentile
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import Delta, SamplingParams
from services.language.model import EngineRequest, LanguageModel
from services.local import ROOT, LanguageProcess, LocalSystem, free_port, wait_for

CLIENTS = (1, 8, 32)
MAX_NEW_TOKENS = 64
ROUNDS = 2
"""Answers each client asks for in a timed run (after one untimed warm-up answer)."""


@dataclasses.dataclass
class Point:
    clients: int
    tokens_per_s: float
    ttft_p50_ms: float
    tokens_per_message: float


class StandInProcess(LanguageProcess):
    """`loadtest.micro.relay_standin` in place of the language service."""

    def start(self, timeout_s: float = 300) -> StandInProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.micro.relay_standin"],
                                     env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_for(self.serving, timeout_s, "language stand-in")
        return self


async def answer(stub: Any, image: bytes, question: str) -> tuple[float, int, int]:
    """(TTFT s, tokens, delta messages) of one streamed answer. A call refused at once
    with RESOURCE_EXHAUSTED (at 32 clients the encoders' queue for the question's text
    tower can be full) is retried with backoff, as the API asks; its TTFT counts from the
    first try."""
    start = time.perf_counter()
    request = vision_pb2.GenerateRequest(
        image=vision_pb2.ImageInput(data=image), prompt=question,
        params=common_pb2.GenerationParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    for attempt in range(20):
        ttft, tokens, messages = 0.0, 0, 0
        try:
            async for event in stub.Generate(request, timeout=120):
                if event.WhichOneof("event") == "delta":
                    ttft = ttft or time.perf_counter() - start
                    tokens += len(event.delta.token_ids)
                    messages += 1
            return ttft, tokens, messages
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or tokens:
                raise
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
    raise RuntimeError("refused 20 times in a row")


async def clients(target: str, image: bytes, count: int) -> Point:
    """`count` clients, each on its own channel, `ROUNDS` answers each after a warm-up."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(count)]
    stubs = [vision_pb2_grpc.VisionServiceStub(c) for c in channels]
    try:
        await asyncio.gather(*(answer(s, image, "warm-up") for s in stubs))
        start = time.perf_counter()

        async def client(i: int, stub: Any) -> list[tuple[float, int, int]]:
            return [await answer(stub, image, f"Question {i}.{r}: what is near item {r}?")
                    for r in range(ROUNDS)]

        done = await asyncio.gather(*(client(i, s) for i, s in enumerate(stubs)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    results = [r for rs in done for r in rs]
    tokens, messages = sum(r[1] for r in results), sum(r[2] for r in results)
    return Point(count, tokens / wall, percentile([r[0] * 1e3 for r in results], 50),
                 tokens / max(messages, 1))


def system_run(stand_in: bool, coalesce: bool, interval_ms: float = 0.0) -> list[Point]:
    env = {"HERO_LANGUAGE_STREAM_COALESCE": str(coalesce).lower(),
           "HERO_LANGUAGE_STREAM_INTERVAL_MS": str(interval_ms)}
    system = LocalSystem("tiny", Path("models"), grpc_port=free_port(), num_cpus=2,
                         allow_unauthenticated=True, language_env=env,
                         vision_args={"stream_coalesce": coalesce})
    if stand_in:
        system.language = StandInProcess("tiny", Path("models").resolve(),
                                         system.language.port, extra_env={
                                             "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED": "true",
                                             **env})
    system.start()
    try:
        image = photo_variant(7)

        async def all_points() -> list[Point]:
            return [await clients(system.target, image, c) for c in CLIENTS]

        return asyncio.run(all_points())
    finally:
        system.stop()


def engine_run() -> list[Point]:
    """The batched engine alone, in process, at each concurrency."""
    model = LanguageModel(resolve_spec("tiny", Path("models")))
    engine = BatchingEngine(model, BatchingConfig())
    packed = packed_tokens(0.111, engine.info.feature_dim, engine.info.tiling)
    params = SamplingParams(MAX_NEW_TOKENS, ignore_eos=True)

    async def one(i: int) -> tuple[float, int]:
        start, ttft, tokens = time.perf_counter(), 0.0, 0
        request = engine.check(EngineRequest(f"r{i}", packed, (("user", f"Question {i}?"),),
                                             params), 4096)
        async for event in engine.stream(request):
            if isinstance(event, Delta):
                ttft = ttft or time.perf_counter() - start
                tokens += len(event.token_ids)
        return ttft, tokens

    async def point(count: int) -> Point:
        await asyncio.gather(*(one(i) for i in range(count)))  # warm-up
        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(count * ROUNDS)))
        wall = time.perf_counter() - start
        return Point(count, sum(d[1] for d in done) / wall,
                     percentile([d[0] * 1e3 for d in done], 50), 1.0)

    try:
        return asyncio.run(_points(point))
    finally:
        engine.shutdown()


async def _points(point: Any) -> list[Point]:
    return [await point(c) for c in CLIENTS]


INTERVAL_MS = 20.0
"""The language service's `stream_interval_ms` default, measured against 0."""
RUNS: tuple[tuple[str, tuple[Any, ...] | None], ...] = (
    ("engine alone (in process, no service)", None),
    ("relay ceiling, coalescing off", (True, False)),
    (f"relay ceiling, coalescing on ({INTERVAL_MS:g} ms)", (True, True, INTERVAL_MS)),
    ("whole system, coalescing off", (False, False)),
    ("whole system, coalescing on, interval 0 ms", (False, True, 0.0)),
    (f"whole system, coalescing on ({INTERVAL_MS:g} ms, the default)",
     (False, True, INTERVAL_MS)))


def run() -> dict[str, list[Point]]:
    results: dict[str, list[Point]] = {}
    for name, setup in RUNS:
        print(f"relay: {name}", flush=True)
        results[name] = engine_run() if setup is None else system_run(*setup)
        print("  " + ", ".join(f"{p.clients}: {p.tokens_per_s:.0f} tok/s "
                               f"ttft {p.ttft_p50_ms:.0f} ms, {p.tokens_per_message:.1f} "
                               f"tok/msg" for p in results[name]), flush=True)
    return results


READING = (
    'Reading: "tokens per streamed delta message" is what coalescing changes; with the '
    'vision service relaying each language message as it comes and Serve taking a '
    "replica's events without back-pressure, merging only what queues behind a busy "
    'writer (interval 0) finds almost nothing to merge, so the language service waits up '
    'to `stream_interval_ms` (default 20 ms: the bound on the inter-token latency it '
    "adds; a stream's first delta is never held) and the vision service merges what "
    "queues. Single-client figures move most with the shared machine's load."
)


def ratios(results: dict[str, list[Point]], on: str, off: str) -> str:
    """`on`'s tokens/s over `off`'s at each client count, e.g. "1.07x at 1, 1.14x at 8"."""
    return ", ".join(f"{a.tokens_per_s / b.tokens_per_s:.2f}x at {a.clients}"
                     for a, b in zip(results[on], results[off], strict=True))


def serial_share(results: dict[str, list[Point]], engine: str, ceiling: str,
                 system: str) -> str:
    """`system`'s tokens/s against the rate of a machine on which the engine and the
    relay take turns (1 / (1/engine + 1/ceiling)): how much of the whole system's
    shortfall against the engine sharing the cores explains."""
    bounds = [1 / (1 / e.tokens_per_s + 1 / r.tokens_per_s)
              for e, r in zip(results[engine], results[ceiling], strict=True)]
    clients = [p.clients for p in results[system]]
    return (
        "Where the rest goes: here the engine and the relay compete for the same cores. "
        "Taking turns, each token would cost the engine's time plus the relay's: "
        "1 / (1/engine alone + 1/relay ceiling) = "
        + ", ".join(f"{b:.0f}" for b in bounds)
        + " tokens/s at " + ", ".join(str(c) for c in clients)
        + " client(s). The default whole system reaches "
        + ", ".join(f"{p.tokens_per_s / b:.0%}" for p, b in zip(results[system], bounds,
                                                               strict=True))
        + " of that (over 100 % where the two overlap on different cores): what it lacks "
        "against the engine alone is the relay's CPU work on shared cores. With the "
        "services on machines of their own (a deployment), the engine does not pay for "
        "the relay.")


def report(results: dict[str, list[Point]]) -> str:
    head = "| | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in CLIENTS) + " |"
    lines = ["## The relay: whole-system tokens/s against the engine and the relay's ceiling",
             "",
             f"`python -m loadtest.bench --only relay`. Tiny LM (the `tiny` preset), cache "
             f"hits, {MAX_NEW_TOKENS} tokens per answer past end of sequence, each client on "
             f"its own channel asking {ROUNDS} answers in a row (closed loop, after one "
             "untimed answer each). Cells: tokens/s (TTFT p50 ms; tokens per streamed delta "
             "message). The relay's ceiling is the same system with a language service "
             "whose engine costs nothing (`loadtest/micro/relay_standin.py`). Coalescing "
             "on: `stream_coalesce` true in both services, the language service's "
             "`stream_interval_ms` as named, the vision service's 0 (its default); off: "
             "`stream_coalesce` false in both.",
             "", head, "|---|" + "---|" * len(CLIENTS)]
    for name, points in results.items():
        cells = [f"{p.tokens_per_s:.0f} ({p.ttft_p50_ms:.0f} ms; {p.tokens_per_message:.1f})"
                 for p in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = [name for name, _ in RUNS]
    lines += ["", READING + " Coalescing (the default) against off: whole system "
              f"{ratios(results, names[5], names[3])}; the relay's ceiling "
              f"{ratios(results, names[2], names[1])} client(s). "
              + serial_share(results, names[0], names[2], names[5]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
