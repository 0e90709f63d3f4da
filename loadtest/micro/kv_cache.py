"""The batched engine's KV cache: prefix reuse for follow-up questions, growing allocation
against up-front reservation, admission past a large request, and the per-step KV read.

Same model and requests as batching.py: LLaVA-NeXT with the ~0.25B Llama, random
weights, fp32, CPU; each image is one 2x2 grid of random features (a different seed per
image), pruned by HERO. Engines are driven through `Engine.stream`, as the gRPC server
drives them. Variants that are compared run one after the other on one loaded model,
taking turns where a figure is repeated, so drift on a shared machine hits both alike.
Run it with `python -m loadtest.micro.kv_report`, which prints the markdown section
(`kv_report` imports this module; this module imports no report, so no import cycle).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from typing import Any, TypeVar

import torch

from loadtest.micro.batching import StepLog, load_model, packed_tokens, wave
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import SamplingParams
from services.language.engine import Finished
from services.language.model import EngineRequest, LanguageModel

RETENTION = 0.111
QUESTIONS = ("What is there in this picture?", "And what colour is the largest thing?")
TTFT_REPEATS = 3
ASKED = 512
"""max_new_tokens of every request in the growth comparison."""
ANSWERS = 12
RESERVATIONS = 4
"""The growth comparison's KV budget: what this many requests reserve up front."""
SMALL, LARGE = 0.056, 0.5
"""Retentions of the small requests in the stream and of the large one behind them."""
STREAM, STREAM_GAP_S, LARGE_AT_S = 8, 0.3, 0.9
BYPASS = (0, 4, 16)


def ask(packed: Any, question: str, max_new_tokens: int, tag: str,
        ignore_eos: bool = True) -> EngineRequest:
    return EngineRequest(tag, packed, (("user", question),),
                         SamplingParams(max_new_tokens, ignore_eos=ignore_eos))


def images(model: LanguageModel, count: int, ratio: float = RETENTION,
           first: int = 0) -> list[Any]:
    return [packed_tokens(ratio, model.info.feature_dim, model.info.tiling, seed)
            for seed in range(first, first + count)]


class Observer(StepLog):
    """Decode steps, prefix-cache lookups and preemptions of one engine."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[tuple[int, int]] = []
        self.preemptions = 0

    def observe_prefix_cache(self, tokens: int, hit_tokens: int) -> None:
        self.lookups.append((tokens, hit_tokens))

    def observe_preemption(self) -> None:
        self.preemptions += 1


E = TypeVar("E", bound=BatchingEngine)


def engine(model: LanguageModel, cls: type[E], **settings: Any) -> E:
    e = cls(model, BatchingConfig(**{"max_batch_size": 16, **settings}))
    e.observer = Observer()
    return e


# -- follow-up questions ----------------------------------------------------------------

def follow_ups(model: LanguageModel, conversations: int, reuse: bool,
               kv_tokens: int) -> tuple[list[float], tuple[int, int]]:
    """TTFT of a follow-up question in each of `conversations` conversations about
    different images, asked at once after every first question was answered (with reuse
    off nothing of the first questions is kept, so they are not asked); and the
    follow-ups' prompt tokens and tokens found in the prefix cache (summed)."""
    e = engine(model, BatchingEngine, prefix_cache=reuse, kv_cache_tokens=kv_tokens)
    observer: Observer = e.observer  # type: ignore[assignment]
    packs = images(model, conversations)
    try:
        if reuse:
            asyncio.run(wave(e, [ask(p, QUESTIONS[0], 1, f"q{i}")
                                 for i, p in enumerate(packs)]))
        seen = len(observer.lookups)
        ttfts, _ = asyncio.run(wave(e, [ask(p, QUESTIONS[1], 1, f"f{i}")
                                        for i, p in enumerate(packs)]))
    finally:
        e.shutdown()
    lookups = observer.lookups[seen:]
    return ttfts, (sum(t for t, _ in lookups), sum(h for _, h in lookups))


def follow_up_section(model: LanguageModel, kv_tokens: int) -> dict[str, Any]:
    """TTFT of a follow-up with and without reuse: alone (median of TTFT_REPEATS, the
    two taking turns) and with 8 conversations at once (p50 and worst)."""
    alone: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(TTFT_REPEATS):
        for reuse in (True, False):
            (ttft,), found = follow_ups(model, 1, reuse, kv_tokens)
            alone[reuse].append(ttft)
            if reuse:
                tokens, hits = found
    eight = {reuse: follow_ups(model, 8, reuse, kv_tokens)[0] for reuse in (True, False)}
    return {"alone": {k: statistics.median(v) for k, v in alone.items()},
            "eight": {k: (statistics.median(t), max(t)) for k, t in eight.items()},
            "tokens": tokens, "hits": hits}


# -- growing allocation against reservation ---------------------------------------------

class ScriptedLengths(BatchingEngine):
    """The real engine, whose answers end (end of sequence) at a length set per request:
    random weights never choose to stop, real answers do, long before max_new_tokens."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lengths: dict[str, int] = {}

    def _sample(self, seqs: list[Any], logits: torch.Tensor) -> list[int | Exception]:
        out = super()._sample(seqs, logits)
        eos = min(self.model.eos_ids)
        return [eos if len(s.text.ids) >= self.lengths[s.request.request_id] else o
                for s, o in zip(seqs, out, strict=True)]


def answer_lengths(count: int) -> list[int]:
    """Answer lengths with a long tail: the quantiles of a log-normal (median 48 tokens,
    sigma 0.7), in a fixed shuffled order."""
    normal = statistics.NormalDist(math.log(48), 0.7)
    lengths = [min(ASKED, round(math.exp(normal.inv_cdf((i + 0.5) / count))))
               for i in range(count)]
    random.Random(7).shuffle(lengths)
    return lengths


async def sampled(e: BatchingEngine, requests: list[EngineRequest]
                  ) -> tuple[list[Finished], list[int]]:
    """`wave`, sampling how many sequences run every 50 ms meanwhile."""
    samples: list[int] = []

    async def poll() -> None:
        while True:
            samples.append(e.stats().running)
            await asyncio.sleep(0.05)
    poller = asyncio.create_task(poll())
    try:
        _, done = await wave(e, requests)
    finally:
        poller.cancel()
    return done, samples


def growth_run(model: LanguageModel, allocation: str, kv_tokens: int) -> dict[str, Any]:
    lengths = answer_lengths(ANSWERS)
    requests = [ask(p, QUESTIONS[0], ASKED, f"{allocation}-{i}", ignore_eos=False)
                for i, p in enumerate(images(model, ANSWERS, first=100))]
    e = engine(model, ScriptedLengths, kv_cache_tokens=kv_tokens, kv_allocation=allocation)
    e.lengths = {r.request_id: n for r, n in zip(requests, lengths, strict=True)}
    start = time.perf_counter()
    try:
        done, running = asyncio.run(sampled(e, requests))
    finally:
        e.shutdown()
    wall = time.perf_counter() - start
    observer: Observer = e.observer  # type: ignore[assignment]
    steps = observer.steps
    assert [f.completion_tokens for f in done] == lengths
    return {"allocation": allocation, "running": statistics.mean(running),
            "peak": max(running), "batch": statistics.mean(b for b, _ in steps),
            "decode_tps": sum(b for b, _ in steps) / sum(s for _, s in steps),
            "end_to_end_tps": sum(lengths) / wall, "wall_s": wall,
            "preemptions": observer.preemptions, "lengths": lengths,
            "queue_p50_s": statistics.median(f.queue_ms for f in done) / 1e3}


# -- a large request behind a stream of small ones --------------------------------------

class Timeline(BatchingEngine):
    """The real engine, noting when each request is first admitted and when it ends."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.admitted: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def _admitted(self, seq: Any) -> None:
        self.admitted.setdefault(seq.request.request_id, time.perf_counter())
        super()._admitted(seq)

    def _finished(self, seq: Any) -> Finished:
        self.ended[seq.request.request_id] = time.perf_counter()
        return super()._finished(seq)


def bound(e: Timeline, arrived: float) -> tuple[int, float]:
    """How many requests were admitted past "large", and when the sequences running at
    the last of those admissions (or at its arrival) had all ended: the stated bound on
    its admission."""
    admitted = e.admitted["large"]
    passed = sorted(t for name, t in e.admitted.items() if arrived < t < admitted)
    last = passed[-1] if passed else arrived
    running = [name for name, t in e.admitted.items()
               if name != "large" and t <= last < e.ended[name]]
    return len(passed), max((e.ended[name] for name in running), default=last)


def stream_run(model: LanguageModel, max_bypass: int, kv_tokens: int) -> dict[str, Any]:
    """Four small requests run; a large one arrives, then STREAM small ones, one every
    STREAM_GAP_S. The large one's wait against its bound, and the small ones' waits."""
    small = images(model, 4 + STREAM, SMALL, first=200)
    large = ask(images(model, 1, LARGE, first=300)[0], QUESTIONS[0], 16, "large")
    e = engine(model, Timeline, kv_cache_tokens=kv_tokens, max_bypass=max_bypass)
    start = time.perf_counter()

    async def one(r: EngineRequest, delay: float) -> Finished:
        await asyncio.sleep(delay)
        (_,), (done,) = await wave(e, [r])
        return done

    async def scenario() -> list[Finished]:
        first = [one(ask(p, QUESTIONS[0], 24, f"s{i}"), 0.0) for i, p in enumerate(small[:4])]
        later = [one(ask(p, QUESTIONS[0], 24, f"s{i + 4}"), LARGE_AT_S + 0.1 + STREAM_GAP_S * i)
                 for i, p in enumerate(small[4:])]
        return await asyncio.gather(*first, one(large, LARGE_AT_S), *later)
    try:
        done = asyncio.run(scenario())
    finally:
        e.shutdown()
    arrived = e.admitted["large"] - done[4].queue_ms / 1e3
    passed, limit = bound(e, arrived)
    stream = [f.queue_ms / 1e3 for f in done[5:]]
    return {"max_bypass": max_bypass, "large_wait_s": done[4].queue_ms / 1e3,
            "bound_s": limit - arrived, "passed": passed,
            "stream_mean_s": statistics.mean(stream), "stream_max_s": max(stream),
            "wall_s": time.perf_counter() - start}


# -- the KV read of a decode step -------------------------------------------------------

@torch.inference_mode()
def gather_share(model: LanguageModel, batch: int, context: int) -> tuple[float, float]:
    """Seconds per decode step spent gathering every layer's keys and values from the
    pool (index_select, as `PooledLayer` does for rows in scattered blocks), and
    seconds of the whole batched decode forward (transformers' own cache)."""
    shape = model.kv_shape()
    pool = torch.zeros(shape.kv_heads, batch * context + 1, shape.head_dim, dtype=shape.dtype)
    index = torch.randperm(batch * context)
    gathers, steps = [], []
    hidden = model.text_config.hidden_size
    out = model.llm(inputs_embeds=torch.randn(batch, context, hidden), use_cache=True)
    ids = torch.ones(batch, 1, dtype=torch.long)
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(2 * shape.layers):
            pool.index_select(1, index)
        gathers.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.llm(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)
        steps.append(time.perf_counter() - start)
    return statistics.median(gathers), statistics.median(steps)


def run() -> dict[str, Any]:
    model = load_model()
    probe = ask(images(model, 1)[0], QUESTIONS[1], 1, "probe")
    prompt = model.prompt_tokens(probe)
    reserve = -(-(prompt + ASKED) // 16) * 16
    warm = engine(model, BatchingEngine)
    asyncio.run(wave(warm, [probe]))  # first forwards of each shape are slow
    warm.shutdown()
    out: dict[str, Any] = {"prompt": prompt, "reserve": reserve,
                           "kv_tokens": RESERVATIONS * reserve}
    out["follow"] = follow_up_section(model, 16 * (prompt + 48))
    print(f"  follow-ups: {out['follow']['alone']}", flush=True)
    out["growth"] = [growth_run(model, a, out["kv_tokens"]) for a in ("reserve", "grow")]
    for g in out["growth"]:
        print(f"  {g['allocation']}: {g['running']:.1f} running, {g['wall_s']:.0f} s", flush=True)
    small = model.prompt_tokens(ask(images(model, 1, SMALL)[0], QUESTIONS[0], 24, "s")) + 24
    large = model.prompt_tokens(ask(images(model, 1, LARGE)[0], QUESTIONS[0], 16, "l")) + 16
    out["stream_kv"] = -(-(large + 2 * small) // 16) * 16
    out["sizes"] = (small, large)
    out["stream"] = [stream_run(model, b, out["stream_kv"]) for b in BYPASS]
    out["gather"] = gather_share(model, 8, prompt + 24)
    return out

