"""Shutdown of the language service: SIGTERM drains it. Running answers finish, new calls
and health checks see it leaving, and what outlives the grace ends with a retryable
UNAVAILABLE, never CANCELLED."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2_grpc

from tests.conftest import ROOT
from tests.service.conftest import free_port, language_server
from tests.service.test_language import requests, wait_until

LONG_ANSWER = 4000
"""Tokens of the answer cut by SIGTERM: several seconds on the tiny model, so the drain
is under way while the test probes the server."""


class Answer(threading.Thread):
    """One streamed answer read in the background: its messages, then its status."""

    def __init__(self, stub: language_pb2_grpc.LanguageServiceStub, reqs: list):
        super().__init__(daemon=True)
        self.call = stub.Generate(iter(reqs), timeout=300)
        self.parts: list = []
        self.first = threading.Event()
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            for response in self.call:
                self.parts.append(getattr(response, response.WhichOneof("part")))
                self.first.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.first.set()

    def tokens(self) -> list[int]:
        return [t for p in self.parts if isinstance(p, common_pb2.TextDelta)
                for t in p.token_ids]


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status


def start_language_process(tmp_path, tiny_dir, grace_s: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp_path / "language.yaml"
    config.write_text(f"port: {port}\nmetrics_port: 0\nmodels_dir: {tiny_dir.parent}\n"
                      f"shutdown_grace_s: {grace_s}\nallow_unauthenticated: true\n"
                      "limits:\n  max_new_tokens: 8192\n")
    proc = subprocess.Popen([sys.executable, "-m", "services.language", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the language service did not start"
        try:
            if health_status(port) == health_pb2.HealthCheckResponse.SERVING:
                return proc, port
        except grpc.RpcError:
            time.sleep(0.2)


def test_sigterm_in_the_middle_of_a_long_answer_lets_it_complete(tmp_path, tiny_dir,
                                                                 astronaut_tokens):
    proc, port = start_language_process(tmp_path, tiny_dir, grace_s=120)
    try:
        stub = language_pb2_grpc.LanguageServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        answer = Answer(stub, requests(astronaut_tokens, max_new_tokens=LONG_ANSWER,
                                       ignore_eos=True))
        assert answer.first.wait(60) and answer.parts, answer.error
        proc.send_signal(signal.SIGTERM)
        # draining: health says so, and a new call is refused with a retryable status
        wait_until(lambda: health_status(port) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(iter(requests(astronaut_tokens, max_new_tokens=4)), timeout=30))
        refused = info.value
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
        assert "shutting down (draining); retry" in refused.details()
        assert answer.is_alive(), "the answer ended before the drain could be observed"
        answer.join(240)
        assert answer.error is None, (answer.error.code(), answer.error.details())
        assert answer.call.code() == grpc.StatusCode.OK
        usage = answer.parts[-1]
        assert isinstance(usage, common_pb2.Usage)
        assert usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert usage.completion_tokens == len(answer.tokens()) == LONG_ANSWER
        # with nothing left to run, the process exits without waiting out its grace
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_a_call_still_running_when_the_grace_ends_gets_unavailable(language_model,
                                                                    astronaut_tokens, engine):
    srv = language_server(language_model, engine=engine, limits={"max_new_tokens": 8192})
    answer = Answer(srv.stub(), requests(astronaut_tokens, max_new_tokens=7000,
                                         ignore_eos=True))
    assert answer.first.wait(60) and answer.parts, answer.error
    started = time.monotonic()
    srv.stop(grace=0.5)
    answer.join(60)
    assert answer.error is not None, "7,000 tokens outlast a 0.5 s grace"
    assert answer.error.code() == grpc.StatusCode.UNAVAILABLE, answer.error.details()
    assert "ran past its 0.5 s drain" in answer.error.details()
    assert time.monotonic() - started < 10
    assert 0 < len(answer.tokens()) < 7000
    assert not any(isinstance(p, common_pb2.Usage) for p in answer.parts)
    assert srv.servicer.admission.reserved == 0 and srv.servicer.drain.in_flight == 0
    assert srv.servicer.metrics.in_flight._value.get() == 0


def test_calls_that_end_within_the_grace_are_not_held_up(language_model, astronaut_tokens):
    """stop() returns once the last call ended, not after the whole grace."""
    srv = language_server(language_model)
    answer = Answer(srv.stub(), requests(astronaut_tokens, max_new_tokens=200,
                                         ignore_eos=True))
    assert answer.first.wait(60)
    started = time.monotonic()
    srv.stop(grace=120.0)
    answer.join(10)
    assert answer.error is None and answer.parts[-1].completion_tokens == 200
    assert time.monotonic() - started < 60
