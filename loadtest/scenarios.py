"""The load benchmark of `make bench`: HERO Serve against the stock baseline, side by side.

Both run the same `tiny` checkpoint on this machine: HERO Serve as the real local
system (Ray Serve vision app, Redis, language service), the baseline as one process
with stock transformers `generate` (no pruning, no cache). Scenarios: cache-hit (a few
images, a new question each time), cache-miss (every image new), and an open-loop
sweep of a mixed workload (80 % repeat images) to find the throughput each sustains
under a p99 TTFT target. Run inside `.ci/isolated`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

from loadtest.runner import Settings, Workload, run
from loadtest.stats import Outcome, summarize

RATES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
TTFT_TARGET_MS = 1000.0
SETTINGS = Settings(max_new_tokens=8, timeout_s=60.0)


class Baseline:
    """The stock server on its own event loop thread."""

    def __init__(self, models_dir: Path):
        from hero_core.models import resolve_spec
        from loadtest import baseline

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            baseline.start(resolve_spec("tiny", models_dir)), self.loop)
        self.server, port = future.result(600)
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def measure(target: str, hit_ratio: float, **kwargs: Any) -> tuple[list[Outcome], float]:
    return asyncio.run(run(target, Workload(hit_ratio, seed=kwargs.pop("seed", 0)), SETTINGS,
                           **kwargs))


def sweep(target: str, seed: int) -> list[dict[str, Any]]:
    points = []
    for rate in RATES:
        outcomes, duration = measure(target, 0.8, mode="open", rate_per_s=rate,
                                     max_requests=int(rate * 10) + 5, max_duration_s=12.0,
                                     seed=seed)
        summary = summarize(outcomes, duration)
        points.append({"rate": rate, **summary})
        if summary["ttft_ms"]["p99"] > 4 * TTFT_TARGET_MS:  # far past saturation: stop
            break
    return points


def run_all(out_dir: Path) -> dict[str, Any]:
    from services.local import LocalSystem, free_port

    models = Path("models")
    system = LocalSystem("tiny", models, grpc_port=free_port(), num_cpus=2,
                         allow_unauthenticated=True)
    system.start()
    baseline = Baseline(models)
    results: dict[str, Any] = {}
    runs: dict[str, list[Outcome]] = {}
    try:
        for name, target, ratio, count in (
                ("HERO Serve, cache hit", system.target, 1.0, 40),
                ("HERO Serve, cache miss", system.target, 0.0, 12),
                ("stock baseline", baseline.target, 0.0, 12)):
            outcomes, duration = measure(target, ratio, mode="closed", concurrency=1,
                                         max_requests=count, max_duration_s=180.0, seed=7)
            runs[name] = outcomes
            results[name] = summarize(outcomes, duration)
        results["sweep"] = {"HERO Serve": sweep(system.target, 11),
                            "stock baseline": sweep(baseline.target, 11)}
    finally:
        baseline.stop()
        system.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-load.json").write_text(json.dumps(
        {"summaries": results, "outcomes": {k: [dataclasses.asdict(o) for o in v]
                                            for k, v in runs.items()}}, indent=1, default=float))
    from loadtest.plots import latency_cdf, latency_vs_load

    latency_cdf(runs, Path("docs/bench-latency-cdf.png"))
    latency_vs_load({name: [(p["throughput_rps"], p["ttft_ms"]["p50"], p["ttft_ms"]["p99"])
                            for p in points] for name, points in results["sweep"].items()},
                    Path("docs/bench-latency-vs-load.png"), TTFT_TARGET_MS)
    return results


def sustained(points: list[dict[str, Any]]) -> float:
    """Highest throughput among sweep points whose p99 TTFT met the target (0 if none)."""
    ok = [p["throughput_rps"] for p in points
          if p["ok"] == p["requests"] and p["ttft_ms"]["p99"] <= TTFT_TARGET_MS]
    return max(ok, default=0.0)


def report(r: dict[str, Any]) -> str:
    hit, miss = r["HERO Serve, cache hit"], r["HERO Serve, cache miss"]
    base = r["stock baseline"]
    rows = [("HERO Serve, cache hit", hit), ("HERO Serve, cache miss", miss),
            ("stock baseline (no pruning, no cache)", base)]
    lines = [
        "## Load: HERO Serve against the stock transformers baseline",
        "",
        f"Same `tiny` checkpoint, same requests (`max_new_tokens` {SETTINGS.max_new_tokens}), "
        "one machine; closed loop",
        "with one request in flight for latency, open-loop Poisson sweeps for throughput.",
        "With the tiny LM, prefill is cheap for both; the gain here comes from the cache and",
        "from not re-encoding images (the prefill section shows the LLM-side gain).",
        "",
        "| run | requests | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | visual tokens "
        "| bytes/request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows:
        sent = f"{s['bytes_sent_mean']:.0f}" if s["bytes_sent_mean"] else "n/a (one process)"
        lines.append(f"| {name} | {s['requests']} | {s['ttft_ms']['p50']:.0f} | "
                     f"{s['ttft_ms']['p99']:.0f} | {s['e2e_ms']['p50']:.0f} | "
                     f"{s['visual_tokens_mean']:.0f} | {sent} |")
    ours = sustained(r["sweep"]["HERO Serve"])
    theirs = sustained(r["sweep"]["stock baseline"])
    ratio = f"{ours / theirs:.1f}x" if theirs else "baseline met the target at no tested rate"
    lines += [
        "",
        f"* Cache-hit TTFT p50 is **1/{miss['ttft_ms']['p50'] / hit['ttft_ms']['p50']:.1f}** of "
        f"cache-miss and **1/{base['ttft_ms']['p50'] / hit['ttft_ms']['p50']:.1f}** of the "
        "baseline.",
        f"* Throughput at p99 TTFT <= {TTFT_TARGET_MS:.0f} ms (80 % repeat images, Poisson "
        f"arrivals at {', '.join(f'{x:g}' for x in RATES)} req/s until p99 passes 4x the "
        f"target): HERO Serve **{ours:.1f} "
        f"req/s**, baseline **{theirs:.1f} req/s** ({ratio}).",
        "* Bytes per request: the tiny tower's features are small, so see the wire section "
        "for what CLIP-L's pruned tokens weigh against the unpruned projected tensor.",
        "",
        "![TTFT and end-to-end latency CDFs](bench-latency-cdf.png)",
        "",
        "![TTFT against throughput](bench-latency-vs-load.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run_all(Path("out"))))
