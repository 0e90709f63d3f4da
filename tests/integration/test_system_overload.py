"""Cancellation, deadlines and overload against the running system: a call that ends on
the client's side ends in the language service too, and past its bounded queue the
system refuses at once instead of growing latency. Runs after test_system_faults.py."""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from services.local import wait_for
from services.sdk.vision import call_metadata, generate_request
from tests.integration.conftest import png
from tests.integration.test_system import Q1, run

LONG = "Please describe everything you can see, in detail."


def language_metrics(system) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The language service's Prometheus samples: (name, labels) -> value."""
    url = f"http://127.0.0.1:{system.language.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finished(system, code: str) -> float:
    return language_metrics(system).get(("hero_language_requests_total", (("code", code),)), 0.0)


def in_flight(system) -> float:
    return language_metrics(system)[("hero_language_in_flight", ())]


def ended(system) -> float:
    """Language calls that ended early: cancelled, or stopped at their deadline."""
    return finished(system, "CANCELLED") + finished(system, "DEADLINE_EXCEEDED")


def wait_cancelled(system, cancelled_before: float, timeout_s: float = 10) -> None:
    """Until the language service has ended one more call early and runs nothing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ended(system) > cancelled_before and in_flight(system) == 0:
            return
        time.sleep(0.1)
    calls = {k: v for k, v in language_metrics(system).items()
             if k[0] in ("hero_language_requests_total", "hero_language_in_flight")}
    raise AssertionError(f"the language service did not see the cancel: {calls}")


def long_call(client, data: bytes, timeout: float):
    # 4096 tokens (past end-of-sequence) take several seconds on the tiny model: far longer
    # than a cancel's trip through Serve
    request = generate_request(data, LONG, max_new_tokens=4096, ignore_eos=True)
    # as the SDK does: the deadline also travels as metadata, which Serve's proxy passes on
    return client.stub.Generate(request, timeout=timeout,
                                metadata=call_metadata(client.metadata, timeout))


def test_a_client_cancel_stops_the_generation_in_the_language_service(system, client, photo):
    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)  # cached: the stream starts at once
    before = ended(system)
    call = long_call(client, data, timeout=4)
    events = iter(call)
    assert next(events).WhichOneof("event") == "accepted"
    assert next(events).WhichOneof("event") == "delta"
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    # Serve's proxy (through services.vision.api.relay) cancels the ingress call, which
    # cancels its language call within tens of ms: the answer (8+ s long) is cut short.
    wait_cancelled(system, before)


def test_a_client_deadline_ends_the_call_in_time_and_frees_the_language_service(
        system, client, photo):
    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)
    before = ended(system)
    start = time.monotonic()
    call = long_call(client, data, timeout=1.5)
    try:
        for _ in call:
            pass
        raise AssertionError("a 4096-token answer finished within 1.5 s; lengthen it")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3.0
    wait_cancelled(system, before)
    # and the system answers the next request as usual
    accepted, tokens, _, usage = run(client, data, Q1, max_new_tokens=3)
    assert accepted.cache_hit and tokens and usage.language.completion_tokens == len(tokens)


def test_past_the_language_queue_requests_are_refused_at_once(system, client, photo):
    """The language service batches 2 sequences and queues 4 (set in conftest); a burst of
    16 long answers: each ends in an answer or RESOURCE_EXHAUSTED naming the queue, and
    a refusal does not wait for room: it comes back before the last answer, which waits
    for two batches ahead of it (ordered by events, not by a wall-clock bound)."""
    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)

    def one(_: int) -> tuple[str, float, str]:
        start = time.monotonic()
        try:
            events = list(client.generate(data, LONG, max_new_tokens=512, ignore_eos=True,
                                          timeout=300))
            assert events[-1].WhichOneof("event") == "usage"
            return "OK", time.monotonic() - start, ""
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - start, exc.details()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(16)))
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert codes.count("RESOURCE_EXHAUSTED") >= 1, codes
    assert codes.count("OK") >= 6, codes  # a batch of 2 and a full queue of 4 were served
    refused = [s for code, s, _ in outcomes if code == "RESOURCE_EXHAUSTED"]
    served = [s for code, s, _ in outcomes if code == "OK"]
    assert max(refused) < max(served), outcomes
    assert all("max_queue=4" in details for code, _, details in outcomes
               if code == "RESOURCE_EXHAUSTED"), outcomes
    wait_for(lambda: in_flight(system) == 0, 10, "language service to drain")
