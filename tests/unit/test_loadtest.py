"""The load generator's own arithmetic: arrivals, percentiles, summaries, workloads."""

import itertools
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.arrivals import poisson_offsets
from loadtest.runner import Workload
from loadtest.stats import Outcome, percentile, summarize


def test_poisson_arrivals_have_the_asked_rate_and_exponential_gaps():
    offsets = poisson_offsets(4.0, 20000, seed=1)
    gaps = np.diff([0.0, *offsets])
    assert all(b > a for a, b in itertools.pairwise(offsets))
    assert abs(statistics.mean(gaps) - 0.25) < 0.01
    assert abs(statistics.stdev(gaps) - 0.25) < 0.01  # exponential: sd == mean
    counts = np.histogram(offsets, bins=np.arange(0, offsets[-1], 1.0))[0]
    assert abs(counts.var() / counts.mean() - 1.0) < 0.1  # Poisson counts: var == mean


def test_arrivals_reproduce_with_a_seed_and_refuse_nonsense():
    assert poisson_offsets(2.0, 10, seed=3) == poisson_offsets(2.0, 10, seed=3)
    assert poisson_offsets(2.0, 10, seed=3) != poisson_offsets(2.0, 10, seed=4)
    with pytest.raises(ValueError):
        poisson_offsets(0.0, 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200),
       st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9,
                                                  abs=1e-9)


def test_summary_counts_codes_and_uses_only_answers_for_latency():
    outcomes = [Outcome("OK", 0.0, ttft_s=0.1, e2e_s=0.2, cache_hit=True, visual_tokens=320,
                        bytes_sent=1000),
                Outcome("OK", 0.0, ttft_s=0.3, e2e_s=0.4, cache_hit=False, visual_tokens=320,
                        bytes_sent=3000),
                Outcome("RESOURCE_EXHAUSTED", 0.0)]
    summary = summarize(outcomes, duration_s=2.0)
    assert summary["codes"] == {"OK": 2, "RESOURCE_EXHAUSTED": 1}
    assert summary["throughput_rps"] == 1.0
    assert summary["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert summary["cache_hit_ratio"] == 0.5 and summary["bytes_sent_mean"] == 2000


def test_workloads_reuse_pool_images_for_hits_and_new_ones_for_misses():
    def image(seed: int) -> bytes:
        return str(seed).encode()

    hits = Workload(1.0, pool=3, image=image)
    requests = [hits.request(i) for i in range(9)]
    assert {img for img, _, _ in requests} == set(hits.warm_images)
    assert len({q for _, q, _ in requests}) == 9  # a new question every time
    misses = Workload(0.0, image=image)
    assert len({misses.request(i)[0] for i in range(9)}) == 9 and not misses.warm_images
    mixed = Workload(0.5, image=image, seed=2)
    share = sum(mixed.request(i)[2] for i in range(2000)) / 2000
    assert abs(share - 0.5) < 0.05


def test_the_locustfile_defines_a_user_with_a_task():
    import ast

    from tests.conftest import ROOT

    tree = ast.parse((ROOT / "loadtest" / "locustfile.py").read_text())
    users = [n for n in tree.body if isinstance(n, ast.ClassDef)
             and any(getattr(b, "id", "") == "User" for b in n.bases)]
    assert users, "no Locust User class"
    tasks = [f for f in users[0].body if isinstance(f, ast.FunctionDef)
             and any(getattr(d, "id", "") == "task" for d in f.decorator_list)]
    assert tasks, "the User has no @task"


def test_soak_verdicts_tell_deserved_outcomes_from_degraded_other_and_lost():
    from loadtest.soak_plan import KINDS, verdict

    kinds = {k.name: k for k in KINDS}
    assert verdict(kinds["hit"], "OK") == "expected"
    assert verdict(kinds["hit"], "UNAVAILABLE") == "degraded"
    assert verdict(kinds["hit"], "RESOURCE_EXHAUSTED") == "degraded"
    assert verdict(kinds["hit"], "INTERNAL") == "other"
    assert verdict(kinds["hit"], "LOST") == "lost"
    assert verdict(kinds["pixel-bomb"], "INVALID_ARGUMENT") == "expected"
    assert verdict(kinds["pixel-bomb"], "OK") == "other"  # a bomb must never be answered
    assert verdict(kinds["deadline"], "DEADLINE_EXCEEDED") == "expected"


def test_soak_report_counts_every_request_once_and_attributes_faults():
    from loadtest.soak_plan import Fault, Result
    from loadtest.soak_report import report

    results = [Result("hit", 1.0, "OK", 0.1, "expected"),
               Result("hit", 9.0, "UNAVAILABLE", 3.0, "degraded", "down"),  # in flight at 10 s
               Result("hit", 12.0, "UNAVAILABLE", 0.2, "degraded", "down"),
               Result("bad-token", 13.0, "UNAUTHENTICATED", 0.01, "expected"),
               Result("miss", 31.0, "LOST", 40.0, "lost", "no status after 40 s"),
               Result("hit", 40.0, "RESOURCE_EXHAUSTED", 0.1, "degraded",
                      "server is full: 3 requests wait (max_queue=3)")]
    # 10 s to 15 s, recovered 2 s after: its window lasts the minimum 15 s, to 30 s
    fault = Fault("redis_kill", "Redis killed", 10.0, 15.0, 2.0)
    text = report({"results": results, "faults": [fault], "duration_s": 60.0, "rate": 1.0,
                   "seed": 0, "memory": [], "steady_from_s": 50.0}, "cmd", "machine")
    assert "**6 requests: 2 got the outcome they deserve, 3 a clear retryable error" in text
    assert "2 of them in flight during a fault or the recovery from it" in text
    assert "1 lost**" in text
    assert "| hit | " in text and "UNAVAILABLE 2, OK 1, RESOURCE_EXHAUSTED 1" in text
    # outside the window: the hit at 1 s, the miss at 31 s and the hit at 40 s
    assert "Outside fault windows, 1 of 3 valid hit and miss requests (33.3%)" in text
    assert "* 1 x RESOURCE_EXHAUSTED: server is full: N requests wait (max_queue=N)" in text
    # the fault row counts the valid requests in flight in its window (hits at 9 and 12 s)
    row = next(line for line in text.splitlines() if line.startswith("| Redis killed"))
    assert "| 2 | UNAVAILABLE 2 | 2.0 |" in row


def test_soak_memory_rows_follow_the_process_alive_at_the_end():
    from loadtest.soak import memory_rows

    samples = {"encoder replica": [(210, 1, 900.0), (225, 2, 500.0), (240, 2, 550.0),
                                   (255, 2, 550.0)]}
    (row,) = memory_rows(samples)
    assert [mb for _, mb in row["series"]] == [500.0, 550.0, 550.0]  # pid 1 was replaced
    assert row["growth_pct"] == pytest.approx(10.0)
    assert row["late_growth_pct"] == pytest.approx(0.0)


def test_soak_report_states_the_limits_the_code_and_config_set(tmp_path, monkeypatch):
    """The report's admission facts come from the Serve config and the language service's
    settings, not from text that would go stale when they change."""
    import yaml

    import services.vision.runner as runner
    from loadtest.soak_plan import Result
    from loadtest.soak_report import report

    config = yaml.safe_load(runner.SERVE_CONFIG.read_text())
    encoder = next(d for d in config["applications"][0]["deployments"]
                   if d["name"] == "Encoder")
    encoder.update(max_ongoing_requests=7, max_queued_requests=5)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(runner, "SERVE_CONFIG", path)
    monkeypatch.setenv("HERO_LANGUAGE_MAX_QUEUE", "11")
    text = report({"results": [Result("hit", 1.0, "OK", 0.1, "expected")], "faults": [],
                   "duration_s": 10.0, "rate": 1.0, "seed": 0, "memory": [],
                   "steady_from_s": 5.0}, "cmd", "machine")
    assert "runs 7 encodes per replica and queues 5." in text
    assert "and 11 more may wait" in text


def test_the_relay_report_bounds_a_shared_machine_by_engine_and_relay_paid_in_turn():
    from loadtest.micro.relay import Point, serial_share

    def points(*rates):
        return [Point(clients, rate, 0.0, 1.0) for clients, rate in zip((1, 8), rates,
                                                                          strict=True)]

    text = serial_share({"engine": points(1000, 600), "ceiling": points(1000, 300),
                         "system": points(250, 200)}, "engine", "ceiling", "system")
    # 1 / (1/1000 + 1/1000) = 500 and 1 / (1/600 + 1/300) = 200
    assert "= 500, 200 tokens/s at 1, 8 client(s)" in text
    assert "reaches 50%, 100% of that" in text
