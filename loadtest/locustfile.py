"""Locust load test of hero.vision.v1.VisionService, for users who prefer Locust.

    pip install locust
    locust -f loadtest/locustfile.py --host 127.0.0.1:9000 --users 8 --spawn-rate 2

Each user asks new questions about images it mostly reuses (`HIT_RATIO`), as in the
`mixed` scenario of `python -m loadtest.runner`. Locust reports two entries per
call: `Generate` (end to end) and `Generate TTFT` (time to the first text delta).
"""

from __future__ import annotations

import time

import grpc
from hero.vision.v1 import vision_pb2_grpc
from locust import User, between, task

from loadtest.runner import Workload
from services.sdk.vision import generate_request

HIT_RATIO = 0.8
MAX_NEW_TOKENS = 16


class VisionUser(User):
    """One client with its own channel and workload."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.workload = Workload(HIT_RATIO, seed=id(self) % 10_000)
        self.count = 0

    def on_stop(self) -> None:
        self.channel.close()

    def _report(self, name: str, seconds: float, size: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=seconds * 1e3, response_length=size,
            exception=error, context={})

    @task
    def ask(self) -> None:
        image, question, _ = self.workload.request(self.count)
        self.count += 1
        request = generate_request(image, question, max_new_tokens=MAX_NEW_TOKENS)
        start, first, size, error = time.perf_counter(), None, 0, None
        try:
            for event in self.stub.Generate(request, timeout=120):
                if event.WhichOneof("event") == "delta":
                    first = first or time.perf_counter()
                    size += len(event.delta.text)
        except grpc.RpcError as exc:
            error = exc
        if first is not None:
            self._report("Generate TTFT", first - start, 0, None)
        self._report("Generate", time.perf_counter() - start, size, error)
