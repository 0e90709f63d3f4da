"""SIGTERM to the vision service's process (`python -m services.vision`, as Compose and a
container runtime send it) in the middle of a long answer: the answer reaches the client
whole, the service reads NOT_SERVING and refuses new calls meanwhile, and the process
exits cleanly. Its own Redis, language service and Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import grpc
import yaml
from grpc_health.v1 import health_pb2
from hero.common.v1 import tensor_pb2 as common_pb2

from services.local import ROOT, LanguageProcess, RedisProcess, free_port, serve_config, wait_for
from services.sdk.vision import VisionClient
from tests.conftest import MODELS_DIR
from tests.integration.conftest import API_TOKEN, png
from tests.integration.test_system import health_status
from tests.integration.test_system_shutdown import Answer

TOKENS = 1500
"""A few seconds of answer: Serve's proxy is still delivering it when the replica is done."""


@contextlib.contextmanager
def vision_process(tmp_path, redis_url: str, language_target: str):
    """`python -m services.vision` on a Serve config of its own; yields (process, target)."""
    grpc_port = free_port()
    config = serve_config({"model": "tiny", "models_dir": str(MODELS_DIR.resolve()),
                           "language_target": language_target, "cache": {"url": redis_url}},
                          grpc_port, free_port())
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "services.vision", "--serve-config",
                             str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HERO_VISION_API_TOKENS": API_TOKEN,
                                 "HERO_VISION_CACHE__SECRET": "sigterm-test-cache-key"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("vision service ready" in line for line in output)
                 or proc.poll() is not None, 300, "the vision service")
        assert proc.poll() is None, "".join(output[-40:])
        yield proc, f"127.0.0.1:{grpc_port}"
    finally:
        if proc.poll() is None:  # the test failed: take Ray's processes down with it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_sigterm_mid_answer_lets_the_answer_reach_the_client_whole(tmp_path, photo):
    redis = RedisProcess(maxmemory="64mb").start()
    language = LanguageProcess("tiny", MODELS_DIR.resolve(), extra_env={
        "HERO_LANGUAGE_LIMITS__MAX_NEW_TOKENS": str(TOKENS),
        # internal, on 127.0.0.1: no token between the services
        "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED": "true"})
    try:
        language.start()
        with vision_process(tmp_path, redis.url, language.target) as (proc, target), \
                VisionClient(target, token=API_TOKEN) as client:
            answer = Answer(client, png(photo), TOKENS)
            assert answer.streaming.wait(120) and answer.error is None, answer.error
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     10, "NOT_SERVING while draining")
            refused = Answer(client, png(photo), 4)
            refused.join(30)
            assert refused.error is not None, "a draining service took a new call"
            assert refused.error.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down (draining); retry" in refused.error.details()
            answer.join(120)
            assert answer.error is None, (answer.error.code(), answer.error.details())
            usage = answer.events[-1].usage.language
            assert usage.completion_tokens == answer.tokens() == TOKENS
            assert usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert proc.wait(120) == 0
    finally:
        language.stop()
        redis.stop()
