"""A peer's benchmark tool against our own: AIPerf over the OpenAI-compatible API, our
load generator over gRPC, the same requests to the same local system.

AIPerf (NVIDIA's LLM benchmark, `aiperf profile`) runs from a virtualenv of its own
(`.venv-aiperf`, made by `make bench`) against `POST /v1/chat/completions` with
streaming; `loadtest.runner` sends the same images and questions to `Generate`. Two
workloads: every request brings a new image, and 80 % of requests repeat one of 4
images (cache hits). Before each run Redis is flushed and the 4 images are cached again,
so each tool meets the same cache. Run inside `.ci/isolated`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from loadtest.runner import Settings, Workload, run
from loadtest.stats import Outcome, summarize

AIPERF = Path(".venv-aiperf/bin/aiperf")
REQUESTS = 24
SETTINGS = Settings(max_new_tokens=16, timeout_s=120.0, ignore_eos=True)
WORKLOADS = (("every request a new image", 0.0), ("80 % repeat 4 images", 0.8))


def write_dataset(workload: Workload, count: int, path: Path) -> dict[str, float]:
    """AIPerf's single-turn JSONL of `workload`'s first `count` requests (the image as a
    PNG data URI), and the mean image and request body sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images, bodies = [], []
    with path.open("w") as out:
        for i in range(count):
            image, question, _ = workload.request(i)
            uri = "data:image/png;base64," + base64.b64encode(image).decode()
            out.write(json.dumps({"text": question, "image": uri}) + "\n")
            images.append(len(image))
            bodies.append(len(uri) + len(question) + 200)
    return {"image_bytes": sum(images) / count, "body_bytes": sum(bodies) / count}


def aiperf_command(base_url: str, dataset: Path, count: int, out_dir: Path) -> list[str]:
    return [str(AIPERF), "profile", "--model", "tiny", "--url", base_url,
            "--endpoint-type", "chat", "--streaming",
            "--custom-dataset-type", "single_turn", "--input-file", str(dataset),
            "--dataset-sampling-strategy", "sequential", "--request-count", str(count),
            "--concurrency", "1", "--tokenizer", "models/tiny/llava",
            "--use-server-token-count",
            "--extra-inputs", f"max_tokens:{SETTINGS.max_new_tokens}",
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
            "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none",
            "--artifact-dir", str(out_dir)]


def aiperf_figures(export: dict[str, Any]) -> dict[str, Any]:
    """AIPerf's own figures from its profile_export_aiperf.json."""
    def pct(name: str) -> dict[str, float]:
        return {q: export[name][q] for q in ("p50", "p99")}

    return {"requests": int(export["request_count"]["avg"]),
            "ok": int(export["completed_request_count"]["avg"]
                      if "completed_request_count" in export
                      else export["request_count"]["avg"]),
            "errors": export.get("error_summary") or [],
            "ttft_ms": pct("time_to_first_token"), "itl_ms": pct("inter_token_latency"),
            "e2e_ms": pct("request_latency"),
            "throughput_rps": export["request_throughput"]["avg"],
            "output_tokens_per_s": export["output_token_throughput"]["avg"]}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_aiperf(base_url: str, dataset: Path, count: int, out_dir: Path) -> dict[str, Any]:
    """AIPerf's figures, and the CPU time its processes used over the whole command."""
    cpu, wall = children_cpu_s(), time.perf_counter()
    done = subprocess.run(aiperf_command(base_url, dataset, count, out_dir),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf failed ({done.returncode}): {done.stderr[-2000:]}")
    export = json.loads((out_dir / "profile_export_aiperf.json").read_text())
    return {**aiperf_figures(export), "first_ttft_ms": first_ttft_ms(out_dir),
            "client_cpu_s": children_cpu_s() - cpu,
            "client_wall_s": time.perf_counter() - wall}


def first_ttft_ms(out_dir: Path) -> float:
    """TTFT of the first request AIPerf sent (its per-request records)."""
    with (out_dir / "profile_export.jsonl").open() as records:
        first = json.loads(records.readline())
    return float(first["metrics"]["time_to_first_token"]["value"])


def with_cpu(measure: Any, *args: Any) -> dict[str, Any]:
    """`measure(*args)`'s figures and the CPU time this process used meanwhile."""
    cpu, wall = time.process_time(), time.perf_counter()
    figures: dict[str, Any] = measure(*args)
    return {**figures, "client_cpu_s": time.process_time() - cpu,
            "client_wall_s": time.perf_counter() - wall}


def run_ours(target: str, hit_ratio: float, seed: int) -> dict[str, Any]:
    outcomes, duration = asyncio.run(run(target, Workload(hit_ratio, seed=seed), SETTINGS,
                                         mode="closed", concurrency=1,
                                         max_requests=REQUESTS, max_duration_s=600.0))
    summary = summarize(outcomes, duration)
    return {**summary, "errors": [code for code in summary["codes"]  # type: ignore[attr-defined]
                                  if code != "OK"]}


async def http_request(session: Any, url: str, image: bytes, question: str) -> Outcome:
    """One streamed chat completion, timed as `loadtest.runner` times a gRPC call: TTFT
    at the first text, tokens from the usage chunk."""
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": "tiny", "max_tokens": SETTINGS.max_new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    outcome = Outcome(code="OK", sent_at=start)
    async with session.post(url, json=body) as response:
        if response.status != 200:
            outcome.code = f"HTTP_{response.status}"
            return outcome
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            choices, usage = chunk.get("choices"), chunk.get("usage")
            if choices and choices[0]["delta"].get("content") and outcome.ttft_s is None:
                outcome.ttft_s = time.perf_counter() - start
            if usage:
                outcome.tokens = usage["completion_tokens"]
                outcome.cache_hit = usage["hero"]["cache_hit"]
    outcome.e2e_s = time.perf_counter() - start
    return outcome


def run_ours_http(base_url: str, hit_ratio: float, seed: int) -> dict[str, Any]:
    """`loadtest.runner`'s closed loop (one in flight) over the OpenAI-compatible API."""
    import aiohttp

    async def main() -> tuple[list[Outcome], float]:
        workload = Workload(hit_ratio, seed=seed)
        timeout = aiohttp.ClientTimeout(total=SETTINGS.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            start = time.perf_counter()
            outcomes = []
            for i in range(REQUESTS):
                image, question, _ = workload.request(i)
                outcomes.append(await http_request(session, f"{base_url}/chat/completions",
                                                   image, question))
            return outcomes, time.perf_counter() - start

    outcomes, duration = asyncio.run(main())
    summary = summarize(outcomes, duration)
    return {**summary, "errors": [code for code in summary["codes"]  # type: ignore[attr-defined]
                                  if code != "OK"]}


def fresh_cache(system: Any, hit_ratio: float, seed: int) -> None:
    """Redis emptied, then the workload's pool images cached again (through gRPC)."""
    import redis

    redis.Redis.from_url(system.redis.url).flushdb()
    asyncio.run(run(system.target, Workload(hit_ratio, seed=seed), SETTINGS, max_requests=0))


def run_all(out_dir: Path) -> dict[str, Any]:
    from services.local import LocalSystem, free_port

    if not AIPERF.exists():
        raise RuntimeError(f"{AIPERF} is missing: `make bench` installs AIPerf there")
    system = LocalSystem("tiny", Path("models"), grpc_port=free_port(), num_cpus=2,
                         allow_unauthenticated=True)
    system.start()
    results: dict[str, Any] = {}
    try:
        for index, (name, ratio) in enumerate(WORKLOADS):
            seed = 50 + index
            dataset = out_dir / f"aiperf-{index}.jsonl"
            sizes = write_dataset(Workload(ratio, seed=seed), REQUESTS, dataset)
            fresh_cache(system, ratio, seed)
            start = time.perf_counter()
            theirs = run_aiperf(system.http_url.removesuffix("/v1"), dataset, REQUESTS,
                                out_dir / f"aiperf-{index}")
            print(f"aiperf, {name}: {time.perf_counter() - start:.0f} s", flush=True)
            fresh_cache(system, ratio, seed)
            ours_http = with_cpu(run_ours_http, system.http_url, ratio, seed)
            fresh_cache(system, ratio, seed)
            ours = with_cpu(run_ours, system.target, ratio, seed)
            results[name] = {"aiperf": theirs, "ours_http": ours_http, "ours": ours, **sizes}
    finally:
        system.stop()
    (out_dir / "bench-aiperf.json").write_text(json.dumps(results, indent=1, default=float))
    return results


TOOLS = (("aiperf", "AIPerf, HTTP + SSE"), ("ours_http", "our client, HTTP + SSE"),
         ("ours", "loadtest.runner, gRPC"))


def _row(name: str, label: str, f: dict[str, Any]) -> str:
    return (f"| {name} | {label} | {f['ok']}/{f['requests']} | {f['ttft_ms']['p50']:.0f} | "
            f"{f['ttft_ms']['p99']:.0f} | {f['itl_ms']['p50']:.2f} | {f['e2e_ms']['p50']:.0f} | "
            f"{f['throughput_rps']:.2f} | {f['output_tokens_per_s']:.1f} | "
            f"{f['client_cpu_s']:.0f} / {f['client_wall_s']:.0f} |")


def _gap(r: dict[str, Any], a: str, b: str, metric: str) -> str:
    unit_digits = 0 if metric == "ttft_ms" else 2
    return f"{r[a][metric]['p50'] - r[b][metric]['p50']:+.{unit_digits}f} ms"


def _gaps(results: dict[str, Any], a: str, b: str) -> str:
    return "; ".join(f"{name}: TTFT p50 {_gap(r, a, b, 'ttft_ms')}, ITL p50 "
                     f"{_gap(r, a, b, 'itl_ms')}" for name, r in results.items())


def _findings(results: dict[str, Any]) -> list[str]:
    miss = next(iter(results.values()))
    aiperf, ours = miss["aiperf"], miss["ours_http"]
    return [
        f"* The API (our HTTP client against our gRPC runner; both time a request the same "
        f"way, so the difference is the API's): {_gaps(results, 'ours_http', 'ours')}. Over "
        f"HTTP a request carries a {miss['body_bytes'] / 1024:.0f} KiB JSON body (the "
        f"{miss['image_bytes'] / 1024:.0f} KiB PNG as base64) through Serve's HTTP proxy, "
        "and the replica parses the JSON and decodes the base64; from there both APIs run "
        "the same pipeline, and the answer comes back as server-sent events instead of "
        "gRPC messages.",
        f"* The tool (AIPerf against our HTTP client, same API and requests): "
        f"{_gaps(results, 'aiperf', 'ours_http')}. AIPerf runs as several processes "
        f"(controller, timing manager, dataset manager, worker, record processors) on the "
        f"same two cores as the system: over its command they used "
        f"{aiperf['client_cpu_s']:.0f} CPU-s in {aiperf['client_wall_s']:.0f} s "
        f"({aiperf['client_cpu_s'] / aiperf['client_wall_s']:.1f} cores on average, startup "
        f"included), our client {ours['client_cpu_s']:.0f} CPU-s in "
        f"{ours['client_wall_s']:.0f} s. That CPU is taken from the server, so AIPerf's own "
        "work lengthens what it measures, most where the server computes most (encoding "
        "new images), and most of all while its processes start: its first request's TTFT "
        f"was {aiperf['first_ttft_ms']:.0f} ms ({next(iter(results))}), which dominates its p99.",
        "* Definitions agree: AIPerf stops TTFT at the first chunk with content, and the API "
        "sends its first chunk (the role and the `hero` figures) with the first text, so "
        "every clock stops at the first token. ITL is (latency - TTFT) / (tokens - 1) per "
        "request in all three, AIPerf with the server's token counts "
        "(`--use-server-token-count`: the tiny model's random tokens do not survive a "
        "decode and re-encode), ours with the deltas' token ids or the usage chunk.",
        "* The three clients run one after another for each workload on a machine shared "
        "with other work, so their figures carry its run-to-run noise; run the section "
        "again to see how much.",
    ]


def report(results: dict[str, Any]) -> str:
    lines = [
        "## A peer's tool: AIPerf over the OpenAI-compatible API, beside our load generator",
        "",
        "AIPerf 0.13.0 (`aiperf profile`, in `.venv-aiperf`) drives the local system "
        "through `POST /v1/chat/completions` with `stream: true`; `loadtest.runner` sends the "
        "same requests through gRPC `Generate`, and a client of ours through the same "
        "HTTP API, to tell the API's cost from the tool's. Same `tiny` system, same images "
        "(PNG; a data URI on HTTP) and questions in the same order, one request in flight, "
        f"{REQUESTS} requests, greedy, {SETTINGS.max_new_tokens} tokens each (`ignore_eos`). "
        "Redis is emptied and the 4 repeated images cached again before every run. Each "
        "tool's figures are its own: AIPerf's from its `profile_export_aiperf.json`, ours "
        "from `loadtest.stats`; client CPU is the CPU time the client used over its run.",
        "",
        "| workload | tool | ok | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | e2e p50 ms "
        "| req/s | output tok/s | client CPU s / wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines += [_row(name, label, r[tool]) for tool, label in TOOLS]
    return "\n".join([*lines, "", "Where they differ, and why:", "", *_findings(results), ""])


if __name__ == "__main__":
    print(report(run_all(Path("out"))))
