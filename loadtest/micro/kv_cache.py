"""The batched engine's KV cache: prefix reuse for follow-up questions, growing allocation
against up-front reservation, admission past a large request, and the per-step KV read.

Same model and requests as batching.py: LLaVA-NeXT with the ~0.25B Llama, random
weights, fp32, CPU; each image is one 2x2 grid of random features (a different seed per
image), pruned by HERO. Engines are driven through `Engine.stream`, as the gRPC server
drives them. Variants that are compared run one after the other on one loaded model,
taking turns where a figure is repeated, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
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
STREAM, STREAM_GAP_S, MAX_BYPASS = 10, 0.3, 4


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


def answer_lengths(count: int, seed: int = 7) -> list[int]:
    """Answer lengths with a long tail: log-normal, median 48 tokens, at most ASKED."""
    rng = random.Random(seed)
    return [max(4, min(ASKED, round(rng.lognormvariate(3.87, 0.7)))) for _ in range(count)]


def growth_run(model: LanguageModel, allocation: str, kv_tokens: int) -> dict[str, Any]:
    lengths = answer_lengths(ANSWERS)
    requests = [ask(p, QUESTIONS[0], ASKED, f"{allocation}-{i}", ignore_eos=False)
                for i, p in enumerate(images(model, ANSWERS, first=100))]
    e = engine(model, ScriptedLengths, kv_cache_tokens=kv_tokens, kv_allocation=allocation)
    e.lengths = {r.request_id: n for r, n in zip(requests, lengths, strict=True)}
    start = time.perf_counter()
    try:
        _, done = asyncio.run(wave(e, requests))
    finally:
        e.shutdown()
    wall = time.perf_counter() - start
    observer: Observer = e.observer  # type: ignore[assignment]
    steps = observer.steps
    assert [f.completion_tokens for f in done] == lengths
    return {"allocation": allocation, "mean_running": statistics.mean(b for b, _ in steps),
            "peak": max(b for b, _ in steps),
            "decode_tps": sum(b for b, _ in steps) / sum(s for _, s in steps),
            "end_to_end_tps": sum(lengths) / wall, "wall_s": wall,
            "preemptions": observer.preemptions, "lengths": lengths,
            "queue_p50_s": statistics.median(f.queue_ms for f in done) / 1e3}


# -- a large request behind a stream of small ones --------------------------------------

class AdmissionOrder(BatchingEngine):
    """The real engine, noting the order in which requests are first admitted."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.order: list[str] = []

    def _admitted(self, seq: Any) -> None:
        if seq.generator is None:
            self.order.append(seq.request.request_id)
        super()._admitted(seq)


def stream_run(model: LanguageModel, max_bypass: int, kv_tokens: int) -> dict[str, Any]:
    """Four small requests run; a large one arrives, then STREAM small ones, one every
    STREAM_GAP_S. The large one's queue wait, the small ones' behind it, and how many
    passed it."""
    small = images(model, 4 + STREAM, SMALL, first=200)
    large = ask(images(model, 1, LARGE, first=300)[0], QUESTIONS[0], 16, "large")
    e = engine(model, AdmissionOrder, kv_cache_tokens=kv_tokens, max_bypass=max_bypass)

    async def one(r: EngineRequest, delay: float) -> Finished:
        await asyncio.sleep(delay)
        (_,), (done,) = await wave(e, [r])
        return done

    async def scenario() -> list[Finished]:
        first = [one(ask(p, QUESTIONS[0], 24, f"s{i}"), 0.0) for i, p in enumerate(small[:4])]
        later = [one(ask(p, QUESTIONS[0], 24, f"s{i + 4}"), 1.0 + STREAM_GAP_S * i)
                 for i, p in enumerate(small[4:])]
        return await asyncio.gather(*first, one(large, 0.9), *later)
    try:
        done = asyncio.run(scenario())
    finally:
        e.shutdown()
    behind = [f.queue_ms / 1e3 for f in done[5:]]
    return {"max_bypass": max_bypass, "large_wait_s": done[4].queue_ms / 1e3,
            "passed": e.order.index("large") - 4,
            "behind_p50_s": statistics.median(behind), "behind_max_s": max(behind)}


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
    print(f"  growth: {[(g['mean_running'], g['wall_s']) for g in out['growth']]}", flush=True)
    small = model.prompt_tokens(ask(images(model, 1, SMALL)[0], QUESTIONS[0], 24, "s")) + 24
    large = model.prompt_tokens(ask(images(model, 1, LARGE)[0], QUESTIONS[0], 16, "l")) + 16
    out["stream_kv"] = -(-(large + 2 * small) // 16) * 16
    out["sizes"] = (small, large)
    out["stream"] = [stream_run(model, b, out["stream_kv"]) for b in (0, MAX_BYPASS)]
    out["gather"] = gather_share(model, 8, prompt + 24)
    return out


def follow_up_lines(r: dict[str, Any]) -> list[str]:
    f = r["follow"]
    (on1, off1), (on8, off8) = (f["alone"][True], f["alone"][False]), (f["eight"][True],
                                                                        f["eight"][False])
    return [
        "### A follow-up question about the same image",
        "",
        "Each conversation asks a first question about its image, then a follow-up about "
        "the same image (the same kept tokens); the follow-up's TTFT is measured with "
        "prefix reuse on and off (off: nothing of the first question is kept). Follow-ups "
        "arrive at once; 1 conversation: median of "
        f"{TTFT_REPEATS}, on and off taking turns.",
        "",
        "| conversations | TTFT without reuse s | TTFT with reuse s | lower by |",
        "|---:|---:|---:|---:|",
        f"| 1 | {off1:.2f} | {on1:.2f} | **{off1 / on1:.1f}x** |",
        f"| 8 (p50) | {off8[0]:.2f} | {on8[0]:.2f} | {off8[0] / on8[0]:.1f}x |",
        f"| 8 (slowest) | {off8[1]:.2f} | {on8[1]:.2f} | {off8[1] / on8[1]:.1f}x |",
        "",
        f"The follow-up's prompt is {f['tokens']} tokens; {f['hits']} of them (the text "
        "before the image and every visual token, in whole blocks) come from the prefix "
        "cache, so only the question is prefilled (target: >= 4x lower TTFT at 1).",
    ]


def growth_lines(r: dict[str, Any]) -> list[str]:
    reserve, grow = r["growth"]
    lengths = reserve["lengths"]
    lines = [
        "### Growing KV allocation against up-front reservation",
        "",
        f"One KV budget, {r['kv_tokens']:,} tokens: what {RESERVATIONS} requests reserve "
        f"up front ({r['reserve']} tokens each: prompt + max_new_tokens {ASKED}, in whole "
        f"blocks). {ANSWERS} requests about different images arrive at once, each asking "
        f"for {ASKED} tokens; their answers end at realistic lengths (log-normal, median "
        f"{statistics.median(lengths):.0f}, longest {max(lengths)}: "
        f"{', '.join(map(str, lengths))}; the benchmark ends each answer there, since "
        "random weights never stop by themselves).",
        "",
        "| allocation | sequences decoding per step (mean) | most | decode tok/s | "
        "end-to-end tok/s | wall s | queue p50 s | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in (reserve, grow):
        lines.append(f"| {g['allocation']} | {g['mean_running']:.1f} | {g['peak']} | "
                     f"{g['decode_tps']:.1f} | {g['end_to_end_tps']:.1f} | "
                     f"{g['wall_s']:.0f} | {g['queue_p50_s']:.1f} | {g['preemptions']} |")
    more = grow["mean_running"] / reserve["mean_running"]
    return [*lines, "", f"Growing allocation runs **{more:.1f}x** the sequences at once "
            f"(target >= 1.5x), and {grow['decode_tps'] / reserve['decode_tps']:.2f}x the "
            "decode tokens/s."]


def stream_lines(r: dict[str, Any]) -> list[str]:
    small, large = r["sizes"]
    lines = [
        "### A large request behind a stream of small ones",
        "",
        f"KV budget {r['stream_kv']:,} tokens. Four small requests (retention {SMALL:g}, "
        f"{small} tokens with their answers) run; a large one (retention {LARGE:g}, "
        f"{large} tokens) arrives and does not fit beside them; then {STREAM} more small "
        f"ones arrive, one every {STREAM_GAP_S} s.",
        "",
        "| max_bypass | large request's wait s | admitted past it | small ones behind it: "
        "wait p50 s | slowest s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in r["stream"]:
        lines.append(f"| {s['max_bypass']} | {s['large_wait_s']:.1f} | {s['passed']} | "
                     f"{s['behind_p50_s']:.1f} | {s['behind_max_s']:.1f} |")
    return [*lines, "", "First come, first served (0) makes every small request wait behind "
            "the large one. With bypass, small requests that fit go first, but at most "
            "`max_bypass` of them: then the large one is next and nothing more is admitted "
            "past it, so it waits at most for those admissions plus the sequences running at "
            "that moment to end (each within its max_new_tokens decode steps)."]


def gather_lines(r: dict[str, Any]) -> list[str]:
    gather, step = r["gather"]
    return [
        "### The KV read of a decode step",
        "",
        f"At batch 8 with {r['prompt'] + 24} tokens of context per row, gathering every "
        f"layer's keys and values from the pool's blocks takes {gather * 1e3:.1f} ms, "
        f"{gather / step:.0%} of the {step * 1e3:.0f} ms batched decode forward. The copy "
        "stays: transformers' attention (SDPA here) takes each row's keys and values as one "
        "tensor, so rows in scattered blocks are gathered; one row whose blocks are "
        "consecutive is read in place (a view, no copy). On a GPU the same gather runs on "
        "the device (an index_select per layer, no host synchronisation), at the device's "
        "memory bandwidth; the `vllm` engine reads its paged cache in place.",
    ]


def report(r: dict[str, Any]) -> str:
    lines = [
        "## Language service: KV blocks, prefix reuse and admission",
        "",
        "The batched engine's KV cache in blocks of 16 tokens, on the model and requests of "
        f"the section above (0.25 B Llama, random weights, fp32, CPU; one 2x2-grid image at "
        f"retention {RETENTION:g}: a {r['prompt']}-token prompt).",
        "",
        *follow_up_lines(r), "", *growth_lines(r), "", *stream_lines(r), "",
        *gather_lines(r),
    ]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    print(report(run()))
