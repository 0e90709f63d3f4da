"""Language-service engines side by side: decode throughput and TTFT of the one-at-a-time
engine against the continuous-batching engine, with the bare batched decode step as
the ceiling, at HERO's retention 0.111 and at full resolution (1.0).

Model: LLaVA-NeXT with a ~0.25B Llama (hidden 1024, 16 layers, GQA 16/4 heads, 32,000
vocabulary), random weights, fp32, CPU, built offline into models/llama-0.3b. Each
request carries the visual embeddings of one 2x2-grid image (HERO's kept tokens and
their newlines at 0.111; all 2,928 at 1.0) and a short question, and generates
`MAX_NEW_TOKENS` tokens (past end of sequence). For every concurrency C, C requests
arrive at once. Both engines get the same KV budget: what 16 requests need at 0.111.
Each batched run is followed at once by the bare batched decode step at batch C, so
the two share the machine's conditions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hero_core.encoder import EncodedCrops
from hero_core.methods import create_method
from hero_core.models import resolve_spec
from hero_core.packing import PackedTokens
from hero_core.stages import prune_crops
from hero_core.tiling import TilingSpec, plan_grid
from hero_core.tiny import LM_SHAPES
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import Delta, SamplingParams
from services.language.engine import Finished
from services.language.model import EngineRequest, LanguageModel
from services.language.sequential import SequentialEngine

LM_NAME = "llama-0.3b"
MODEL_DIR = Path("models") / LM_NAME
CONCURRENCY = (1, 4, 8, 16)
RETENTIONS = (0.111, 1.0)
MAX_NEW_TOKENS = 48
FIT_AT_0111 = 16
"""The KV budget is what this many requests reserve at retention 0.111."""


def load_model() -> LanguageModel:
    from hero_core.tiny import build_tiny, is_built

    if not is_built(MODEL_DIR, lm=LM_NAME):
        build_tiny(MODEL_DIR, lm=LM_NAME)
    return LanguageModel(resolve_spec(str((MODEL_DIR / "llava").resolve()), MODEL_DIR))


def packed_tokens(ratio: float, feature_dim: int, tiling: TilingSpec,
                  seed: int = 0) -> PackedTokens:
    """What the vision service sends for a 2x2-grid image at `ratio` (random features;
    another `seed`, another image)."""
    grid = plan_grid((672, 680), tiling)
    g = torch.Generator().manual_seed(seed)
    n = grid.num_crops
    crops = EncodedCrops(torch.randn(n, grid.tokens_per_crop, feature_dim, generator=g),
                         {layer: torch.rand(n, grid.tokens_per_crop, generator=g)
                          for layer in (11, 22)}, {},
                         torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1))
    method = create_method("full" if ratio >= 1.0 else "hero")
    return prune_crops(crops, grid, method, ratio).packed


def make_requests(packed: PackedTokens, count: int, tag: str) -> list[EngineRequest]:
    """`count` requests of the same length (so each reserves the same KV)."""
    params = SamplingParams(MAX_NEW_TOKENS, ignore_eos=True)
    return [EngineRequest(f"{tag}-{i}", packed, (("user", "What is there in this picture?"),),
                          params) for i in range(count)]


class StepLog:
    """The batched engine's observer: every decode step's batch size and time."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.steps.append((batch_size, seconds))

    def observe_queue_wait(self, seconds: float) -> None:
        pass

    def observe_prefix_cache(self, tokens: int, hit_tokens: int) -> None:
        pass

    def observe_preemption(self) -> None:
        pass


@dataclasses.dataclass
class Row:
    engine: str
    retention: float
    concurrency: int
    decode_tps: float
    """Decode tokens per second with C sequences decoding: for the batched engine, over
    its steps with all C in the batch; one at a time, each request's own rate."""
    wave_tps: float
    """Decode tokens (after each first token) per second spent decoding, whole wave."""
    ttft_p50_s: float
    ttft_p99_s: float
    end_to_end_tps: float
    """Every generated token over the wave's wall time (prefills included)."""
    peak_batch: int
    bare_tps: float = 0.0
    """The bare batched decode step at batch C, measured right after this run."""


async def wave(engine: Any, requests: list[EngineRequest]) -> tuple[list[float], list[Finished]]:
    """All requests at once; time to first token of each and their `Finished`."""
    async def one(request: EngineRequest) -> tuple[float, Finished]:
        submitted, done = time.perf_counter(), None
        async for event in engine.stream(request):
            if not isinstance(event, Delta):
                done = event
        assert done is not None
        return done.first_token_at - submitted, done

    results = await asyncio.gather(*[one(r) for r in requests])
    return [t for t, _ in results], [f for _, f in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(kind: str, engine: Any, retention: float, requests: list[EngineRequest],
            log: StepLog | None) -> Row:
    start = time.perf_counter()
    ttfts, done = asyncio.run(wave(engine, requests))
    wall = time.perf_counter() - start
    decode_tokens = sum(f.completion_tokens - 1 for f in done)
    if log is None:  # one at a time: each request's decode time is its own
        decode_s = sum((f.completion_tokens - 1) / f.decode_tokens_per_s for f in done)
        steady, peak = decode_tokens / decode_s, 1
    else:
        decode_s = sum(s for _, s in log.steps)
        full = [(b, s) for b, s in log.steps if b == len(requests)]
        steady = sum(b for b, _ in full) / sum(s for _, s in full) if full else 0.0
        peak = max(b for b, _ in log.steps)
    return Row(kind, retention, len(requests), steady, decode_tokens / decode_s,
               statistics.median(ttfts), percentile(ttfts, 0.99),
               sum(f.completion_tokens for f in done) / wall, peak)


@torch.inference_mode()
def bare_step(model: LanguageModel, context: int, batch: int, repeats: int = 7) -> float:
    """Tokens/s of a plain batched decode forward with the KV of `context` tokens in place
    (transformers' DynamicCache, no server, no sampling)."""
    hidden = model.text_config.hidden_size
    out = model.llm(inputs_embeds=torch.randn(batch, context, hidden), use_cache=True)
    cache, ids, times = out.past_key_values, torch.ones(batch, 1, dtype=torch.long), []
    for _ in range(repeats):
        start = time.perf_counter()
        h = model.llm(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        model.lm_head(h[:, -1])
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


TTFT_REPEATS = 7
"""Single requests per engine behind the TTFT-alone comparison."""


def ttft_ab(engines: dict[str, Any], request: EngineRequest, repeats: int = TTFT_REPEATS
            ) -> dict[str, float]:
    """Median time to first token of one request alone, the engines taking turns (so
    drift on a shared machine hits both alike)."""
    one = dataclasses.replace(request, params=SamplingParams(1))
    times: dict[str, list[float]] = {kind: [] for kind in engines}
    for _ in range(repeats):
        for kind, make in engines.items():
            engine = make()
            (ttft,), _ = asyncio.run(wave(engine, [one]))
            engine.shutdown()
            times[kind].append(ttft)
    return {kind: statistics.median(t) for kind, t in times.items()}


def run(concurrency: tuple[int, ...] = CONCURRENCY,
        retentions: tuple[float, ...] = RETENTIONS) -> dict[str, Any]:
    model = load_model()
    packed = {r: packed_tokens(r, model.info.feature_dim, model.info.tiling) for r in retentions}
    probe = {r: make_requests(packed[r], 1, "probe")[0] for r in retentions}
    block = BatchingConfig.model_fields["block_size"].default
    reserve = {r: -(-(model.prompt_tokens(probe[r]) + MAX_NEW_TOKENS) // block) * block
               for r in retentions}
    low = min(retentions)
    kv_tokens = FIT_AT_0111 * reserve[low]
    context = model.prompt_tokens(probe[low]) + MAX_NEW_TOKENS // 2
    settings = BatchingConfig(max_batch_size=max(concurrency), kv_cache_tokens=kv_tokens,
                              prefix_cache=False)  # the requests are alike: reuse is measured
    # in the KV cache section
    engines = {"one at a time": lambda: SequentialEngine(model, slots=1),
               "batched": lambda: BatchingEngine(model, settings)}
    for make in engines.values():  # first forwards of each shape are slow: not measured
        engine = make()
        asyncio.run(wave(engine, make_requests(packed[low], 1, "warmup")))
        engine.shutdown()
    ttft_alone = ttft_ab(engines, probe[low])
    rows = []
    for retention in retentions:
        for c in concurrency:
            requests = make_requests(packed[retention], c, f"{retention}-{c}")
            for kind, make in engines.items():
                engine, log = make(), (StepLog() if kind == "batched" else None)
                engine.observer = log
                rows.append(measure(kind, engine, retention, requests, log))
                engine.shutdown()
            if retention == low:
                rows[-1].bare_tps = bare_step(model, context, c)
            print(f"  retention {retention} x{c}: " + ", ".join(
                f"{row.engine} {row.wave_tps:.1f} tok/s" for row in rows[-2:]), flush=True)
    params = sum(p.numel() for p in model.llm.parameters()) + model.lm_head.weight.numel()
    return {"rows": rows, "ttft_alone": ttft_alone, "kv_tokens": kv_tokens,
            "reserve": reserve, "context": context,
            "params": params, "kv_bytes_per_token": model.kv_shape().bytes_per_token}


PREFILL_CHUNK = BatchingConfig.model_fields["max_prefill_tokens_per_step"].default
"""The batched engine's default prefill chunk, which these runs use."""


def lm_shape(name: str = LM_NAME) -> str:
    """The benchmark LM's shape, as the model builder defines it."""
    shape = LM_SHAPES[name]
    return (f"hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, GQA "
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, "
            f"{shape['vocab_size']:,} vocabulary")


def find(rows: list[Row], engine: str, retention: float, c: int) -> Row:
    return next(r for r in rows if (r.engine, r.retention, r.concurrency) == (engine, retention, c))


def column_notes(context: int) -> list[str]:
    """What the table's columns measure."""
    return [
        "* **C decoding**: decode tokens per second while C sequences decode: for the batched "
        "engine over its steps with all C in the batch (sampling and streaming included), "
        "for the one-at-a-time engine each request's own decode rate (it never decodes two "
        "at once).",
        "* **whole wave**: every token after each request's first, per second spent in decode "
        "steps over the whole run, including the first steps (later prompts still being "
        "prefilled, so fewer than C decode) and the last (sequences leaving).",
        "* **bare step**: a plain batched decode forward of the same model at batch C with "
        f"the KV of {context} tokens per row in place (transformers' DynamicCache, no "
        "server, no sampling), measured right after the batched run.",
        "* **TTFT**: arrival to first token over the C requests; **end-to-end**: every "
        "token over the wave's wall time, prefills included.",
    ]


def report(r: dict[str, Any], plot_path: Path | None = None) -> str:
    rows = r["rows"]
    retentions = sorted({row.retention for row in rows})
    fits = {ret: r["kv_tokens"] // r["reserve"][ret] for ret in retentions}
    lines = [
        "## Language service: continuous batching against one at a time",
        "",
        f"LLaVA-NeXT with a {r['params'] / 1e9:.2f} B Llama ({lm_shape()}), random weights, "
        "fp32, CPU. Each request: one 2x2-grid "
        f"image's visual embeddings and a short question, {MAX_NEW_TOKENS} generated tokens; "
        "C requests arrive at once, after a warm-up request through each engine. Engines "
        "driven through the API the gRPC server uses (`Engine.stream`); the one-at-a-time "
        "engine has one slot, the batched engine its default prefill chunk "
        f"({PREFILL_CHUNK} tokens), prefix reuse off (every request here carries the same "
        "image and question; the next section measures reuse) and "
        f"the same KV budget in every run: {r['kv_tokens']:,} tokens "
        f"({r['kv_tokens'] * r['kv_bytes_per_token'] / 2**20:.0f} MiB), which holds " +
        ", ".join(f"{fits[ret]} requests at retention {ret:g} ({r['reserve'][ret]:,} tokens "
                  "each: prompt + visual + max_new_tokens, in whole blocks)"
                  for ret in retentions) + ".",
        "",
        *column_notes(r["context"]),
        "",
        "| retention | C | engine | C decoding tok/s | vs one at a time | whole wave tok/s "
        "| bare step tok/s | C decoding / bare | TTFT p50 s | TTFT p99 s | end-to-end tok/s "
        "| most running |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = find(rows, "one at a time", row.retention, row.concurrency)
        steady = f"{row.decode_tps:.1f}" if row.decode_tps else "-"
        ratio = f"{row.decode_tps / base.decode_tps:.2f}x" if row.decode_tps else "-"
        bare = f"{row.bare_tps:.1f}" if row.bare_tps else ""
        eff = f"{row.decode_tps / row.bare_tps:.0%}" if row.bare_tps and row.decode_tps else ""
        lines.append(
            f"| {row.retention:g} | {row.concurrency} | {row.engine} | {steady} | {ratio} | "
            f"{row.wave_tps:.1f} | {bare} | {eff} | {row.ttft_p50_s:.2f} | "
            f"{row.ttft_p99_s:.2f} | {row.end_to_end_tps:.1f} | {row.peak_batch} |")
    lines += ["", *conclusions(r, fits)]
    if plot_path is not None:
        plot(r, plot_path)
        lines += ["", f"![decode throughput and TTFT against concurrency]({plot_path.name})"]
    return "\n".join([*lines, ""])


def conclusions(r: dict[str, Any], fits: dict[float, int]) -> list[str]:
    rows, low = r["rows"], min(fits)
    cs = sorted({row.concurrency for row in rows})
    top = max(cs)
    out = []
    if 8 in cs:
        b8, s8 = find(rows, "batched", low, 8), find(rows, "one at a time", low, 8)
        out.append(f"At 8 concurrent requests (retention {low:g}) the batched engine decodes "
                   f"**{b8.decode_tps / s8.decode_tps:.2f}x** the one-at-a-time engine's "
                   f"tokens/s with all 8 decoding (target >= 2.5x), "
                   f"{b8.wave_tps / s8.wave_tps:.2f}x over the whole wave; with all 8 decoding "
                   f"it reaches **{b8.decode_tps / b8.bare_tps:.0%}** of the bare batched step "
                   "(target >= 80 %).")
    alone = r["ttft_alone"]
    out.append(f"At 1 request its TTFT is **{alone['batched'] / alone['one at a time']:.2f}x** "
               f"the one-at-a-time engine's (target <= 1.1x): median of {TTFT_REPEATS} single "
               f"requests at retention {low:g}, the engines taking turns, {alone['batched']:.2f} s "
               f"against {alone['one at a time']:.2f} s.")
    if len(fits) > 1:
        high = max(fits)
        out.append(f"Same KV budget, retention {high:g}: {fits[high]} requests fit at once "
                   f"against {fits[low]} at {low:g}. At {top} concurrent requests the batched "
                   f"engine decodes {find(rows, 'batched', low, top).wave_tps:.1f} tok/s at "
                   f"{low:g} and {find(rows, 'batched', high, top).wave_tps:.1f} at {high:g} "
                   "(whole wave): the tokens HERO drops become batch places, and the batch "
                   "is where the throughput is.")
    bare = {row.concurrency: row.bare_tps for row in rows
            if row.engine == "batched" and row.retention == low and row.bare_tps}
    if 1 in bare and top in bare:
        out.append(f"On this CPU a batch of {top} decodes only {bare[top] / bare[1]:.1f}x the "
                   "tokens/s of one sequence (the bare step column); on a GPU, where one "
                   "sequence leaves the device mostly idle, the same engine's gain is far "
                   "larger.")
    out.append(f"Prefill is chunked at {PREFILL_CHUNK} tokens per step while others decode, so "
               "a new prompt stalls them for one chunk; the whole-wave numbers pay for that "
               "bound on inter-token latency.")
    return [line for c in out for line in (c, "")][:-1]


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    fig, (tps, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for retention in sorted({row.retention for row in rows}):
        for engine, style in (("one at a time", "--"), ("batched", "-")):
            sel = [row for row in rows if (row.engine, row.retention) == (engine, retention)]
            cs = [row.concurrency for row in sel]
            label = f"{engine}, R={retention:g}"
            tps.plot(cs, [row.wave_tps for row in sel], style, marker="o", label=label)
            ttft.plot(cs, [row.ttft_p50_s for row in sel], style, marker="o", label=label)
    bare = sorted((row.concurrency, row.bare_tps) for row in rows if row.bare_tps)
    tps.plot([c for c, _ in bare], [t for _, t in bare], ":", color="black",
             label="bare batched step")
    cs = sorted({row.concurrency for row in rows})
    tps.set(xlabel="concurrent requests", ylabel="decode tokens/s (whole wave)", xticks=cs,
            title="decode throughput")
    ttft.set(xlabel="concurrent requests", ylabel="TTFT p50 (s)", xticks=cs, yscale="log",
             title="time to first token")
    tps.legend(fontsize=8)
    ttft.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(report(run()))
