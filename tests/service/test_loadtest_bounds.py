"""The load generator against a real server: it stops at its bounds, whatever happens."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadtest.runner import Settings, Workload, run
from tests.service.conftest import free_port


@pytest.fixture(scope="module")
def baseline(tiny_dir):
    from hero_core.models import resolve_spec
    from loadtest import baseline as stock

    loop = asyncio.new_event_loop()
    server, port = loop.run_until_complete(stock.start(resolve_spec("tiny", tiny_dir.parent)))
    yield loop, f"127.0.0.1:{port}"
    loop.run_until_complete(server.stop(0))
    loop.close()


def tiny_image(seed: int) -> bytes:
    from tests.conftest import noise_image
    from tests.integration.conftest import png

    return png(noise_image(64, 96, seed))


def test_closed_loop_stops_at_the_request_count(baseline):
    loop, target = baseline
    outcomes, _ = loop.run_until_complete(run(
        target, Workload(0.0, image=tiny_image), Settings(max_new_tokens=2), mode="closed",
        concurrency=2, max_requests=5, max_duration_s=120))
    assert len(outcomes) == 5 and all(o.code == "OK" for o in outcomes)
    assert all(o.ttft_s is not None and o.e2e_s >= o.ttft_s for o in outcomes)


def test_open_loop_stops_at_the_duration(baseline):
    loop, target = baseline
    start = time.monotonic()
    outcomes, _ = loop.run_until_complete(run(
        target, Workload(0.0, image=tiny_image), Settings(max_new_tokens=1, timeout_s=10),
        mode="open", rate_per_s=20, max_requests=10_000, max_duration_s=1.0))
    assert 5 <= len(outcomes) <= 60  # about 20/s for 1 s; nowhere near the request bound
    assert time.monotonic() - start < 1.0 + 10 + 5


def test_an_unreachable_target_ends_promptly_with_errors_counted():
    start = time.monotonic()
    outcomes, _ = asyncio.run(run(
        f"127.0.0.1:{free_port()}", Workload(0.0, image=tiny_image),
        Settings(timeout_s=2.0), mode="closed", concurrency=2, max_requests=4,
        max_duration_s=30))
    assert len(outcomes) == 4 and {o.code for o in outcomes} == {"UNAVAILABLE"}
    assert time.monotonic() - start < 15
