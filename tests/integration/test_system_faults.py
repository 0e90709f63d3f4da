"""Faults against the running system: every request ends in an answer or a clear error
within its deadline, and the system recovers by itself. Runs after test_system.py."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import noise_image
from tests.integration.conftest import png
from tests.integration.test_system import Q1, Q2, health_status, run


def test_language_service_killed_mid_stream_gives_unavailable_promptly(system, client, photo):
    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)  # cached, so the stream starts fast
    events = client.generate(data, "Please describe everything.", max_new_tokens=4096,
                             ignore_eos=True, timeout=60)
    assert next(events).WhichOneof("event") == "accepted"
    assert next(events).WhichOneof("event") == "delta"
    killed = time.monotonic()
    system.language.proc.kill()
    with pytest.raises(grpc.RpcError) as info:
        for _ in events:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "language service" in info.value.details()
    assert time.monotonic() - killed < 10

    # While it is down: retried with backoff, then UNAVAILABLE; no hang.
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        run(client, data, Q2, max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 15
    assert settled_health(system.target, NOT_SERVING) == NOT_SERVING

    system.language.start()  # same port: the vision service reconnects by itself
    accepted, tokens, _, _ = run(client, data, Q2, max_new_tokens=3)
    assert accepted.cache_hit and tokens
    assert settled_health(system.target, SERVING) == SERVING


SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)


def settled_health(target: str, expected: int, within_s: float = 10.0) -> int:
    """The public port's health once it reads `expected` (or `within_s` has passed)."""
    until = time.monotonic() + within_s
    status = health_status(target)
    while status != expected and time.monotonic() < until:
        time.sleep(0.25)
        status = health_status(target)
    return status


def test_an_encoder_replica_crash_is_replaced_and_errors_are_clear(system, client):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "Encoder" in a["name"]]
    assert replicas
    for replica in replicas:
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]),
                 no_restart=True)
    deadline = time.monotonic() + 180
    seed = 500
    while True:
        seed += 1
        try:
            accepted, tokens, _, _ = run(client, png(noise_image(300, 400, seed)), Q1,
                                         max_new_tokens=2)
            break
        except grpc.RpcError as exc:  # while Serve replaces the replica: a clear code
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED), exc.details()
            assert time.monotonic() < deadline, "the encoder never came back"
            time.sleep(1)
    assert not accepted.cache_hit and tokens
