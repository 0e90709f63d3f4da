"""The AIPerf comparison's own plumbing, without AIPerf or a system: the dataset it is
given, the command it runs, the figures read from its export, inter-token latency as
our load generator computes it, and the section written from the results."""

from __future__ import annotations

import base64
import json

import pytest

from loadtest import aiperf_peer
from loadtest.runner import Workload
from loadtest.stats import Outcome, summarize


def tiny_image(seed: int) -> bytes:
    return b"\x89PNG" + bytes([seed % 256]) * 8


def test_the_dataset_is_the_workloads_requests_in_order(tmp_path):
    workload = Workload(0.8, pool=2, seed=5, image=tiny_image)
    path = tmp_path / "in.jsonl"
    sizes = aiperf_peer.write_dataset(workload, 6, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    again = Workload(0.8, pool=2, seed=5, image=tiny_image)  # what our runner will send
    for i, line in enumerate(lines):
        image, question, _ = again.request(i)
        assert line["text"] == question
        assert base64.b64decode(line["image"].split(",", 1)[1]) == image
        assert line["image"].startswith("data:image/png;base64,")
    assert sizes["image_bytes"] == 12 and sizes["body_bytes"] > sizes["image_bytes"]


def test_aiperf_is_asked_for_what_the_comparison_needs(tmp_path):
    command = aiperf_peer.aiperf_command("http://127.0.0.1:8000", tmp_path / "in.jsonl", 24,
                                         tmp_path / "out")
    text = " ".join(command)
    for flag in ("--endpoint-type chat", "--streaming", "--custom-dataset-type single_turn",
                 "--dataset-sampling-strategy sequential", "--request-count 24",
                 "--concurrency 1", "--use-server-token-count", "ignore_eos:true",
                 "temperature:0", f"max_tokens:{aiperf_peer.SETTINGS.max_new_tokens}",
                 "--no-server-metrics", "--tokenizer models/tiny/llava"):
        assert flag in text, flag


def export(ttft: float, itl: float) -> dict:
    def stat(p50: float) -> dict:
        return {"unit": "ms", "avg": p50, "p50": p50, "p99": 2 * p50}
    return {"request_count": {"avg": 24.0}, "completed_request_count": {"avg": 24.0},
            "time_to_first_token": stat(ttft), "inter_token_latency": stat(itl),
            "request_latency": stat(ttft + 15 * itl), "request_throughput": {"avg": 2.0},
            "output_token_throughput": {"avg": 32.0}, "error_summary": []}


def test_aiperfs_figures_are_read_from_its_export():
    figures = aiperf_peer.aiperf_figures(export(100.0, 2.0))
    assert figures["ttft_ms"] == {"p50": 100.0, "p99": 200.0}
    assert figures["itl_ms"]["p50"] == 2.0 and figures["ok"] == 24
    assert (figures["throughput_rps"], figures["output_tokens_per_s"]) == (2.0, 32.0)


def test_inter_token_latency_is_the_time_after_the_first_token_per_token():
    outcomes = [Outcome("OK", 0.0, ttft_s=0.1, e2e_s=0.25, tokens=16),
                Outcome("OK", 0.0, ttft_s=0.2, e2e_s=0.2, tokens=1),  # no gap to measure
                Outcome("UNAVAILABLE", 0.0)]
    assert outcomes[0].itl_s == pytest.approx(0.01) and outcomes[1].itl_s is None
    summary = summarize(outcomes, 2.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(10.0)
    assert summary["output_tokens_per_s"] == pytest.approx(8.5)


def test_the_section_puts_the_three_clients_side_by_side():
    def ours(ttft: float, itl: float = 2.0) -> dict:
        return {**aiperf_peer.aiperf_figures(export(ttft, itl)), "client_cpu_s": 1.0,
                "client_wall_s": 10.0}
    results = {name: {"aiperf": {**ours(ttft + 300, 3.0), "client_cpu_s": 15.0,
                                 "first_ttft_ms": 9000.0},
                      "ours_http": ours(ttft + 10), "ours": ours(ttft),
                      "image_bytes": 800 << 10, "body_bytes": 1100 << 10}
               for name, ttft in (("new images", 500.0), ("repeats", 60.0))}
    text = aiperf_peer.report(results)
    rows = [line for line in text.splitlines() if line.startswith("| new images")]
    assert len(rows) == 3 and "| 800 |" in rows[0] and "| 510 |" in rows[1]
    assert "new images: TTFT p50 +10 ms, ITL p50 +0.00 ms" in text  # the API's own cost
    assert "new images: TTFT p50 +290 ms, ITL p50 +1.00 ms" in text  # the tool's
    assert "15 CPU-s in 10 s (1.5 cores" in text and "was 9000 ms (new images)" in text


def test_the_first_request_is_read_from_aiperfs_records(tmp_path):
    records = [{"metadata": {}, "metrics": {"time_to_first_token": {"value": v}}}
               for v in (9000.5, 80.0)]
    (tmp_path / "profile_export.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    assert aiperf_peer.first_ttft_ms(tmp_path) == 9000.5
