"""The OpenAI-compatible API's door under abuse and faults: a 200 MiB body, with or
without a token, chunked or with its length, is refused within a second, before it is
read, without Serve's proxy or the ingress replica growing by its size; a language
service that is down is 503 with Retry-After. Runs after
test_system_openai.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from services.local import wait_for
from tests.integration.conftest import API_TOKEN
from tests.integration.test_system_faults import SERVING, settled_health
from tests.integration.test_system_openai import messages, post

MIB = 1 << 20
BODY = 200 * MIB
PROCESSES = ("ProxyActor", "ServeReplica:hero:VisionIngress")


def serve_processes() -> list[psutil.Process]:
    """This test session's Serve HTTP proxy and ingress replica processes."""
    found = [p for p in psutil.Process().children(recursive=True)
             if any(name in " ".join(p.cmdline()) for name in PROCESSES)]
    assert len(found) >= 2, [" ".join(p.cmdline())[:80] for p in found]
    return found


class PeakGrowth:
    """Largest RSS growth of each process while the block runs, sampled every 5 ms."""

    def __init__(self, processes: list[psutil.Process]):
        self.processes = processes
        self.base = [p.memory_info().rss for p in processes]
        self.peak = [0] * len(processes)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            for i, process in enumerate(self.processes):
                self.peak[i] = max(self.peak[i], process.memory_info().rss - self.base[i])

    def __enter__(self) -> PeakGrowth:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # what arrives after the answer still counts
        self.done.set()
        self.thread.join()

    @property
    def largest_mib(self) -> float:
        return max(self.peak) / MIB


def chunked(total: int, size: int = MIB) -> Iterator[bytes]:
    """`total` bytes of a JSON-looking body in HTTP chunked framing, made as sent."""
    piece = b" " * size
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def upload(port: int, headers: dict[str, str], body: Iterator[bytes], timeout_s: float = 30
           ) -> tuple[int, float, int]:
    """(status, seconds until the status line arrived, bytes sent by then) of a POST whose
    body a thread sends from `body` while this one waits for the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "hero", **headers}.items())
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode())
    sent, stop = [0], threading.Event()

    def send() -> None:
        try:
            for chunk in body:
                if stop.is_set():
                    return
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass  # the server closed the connection: the answer is there to read

    thread = threading.Thread(target=send, daemon=True)
    start = time.monotonic()
    thread.start()
    answer = b""
    try:
        while b"\r\n" not in answer:
            part = sock.recv(4096)
            if not part:
                break
            answer += part
    finally:
        elapsed, sent_then = time.monotonic() - start, sent[0]
        stop.set()
        sock.close()
        thread.join(10)
    return int(answer.split(b" ", 2)[1]), elapsed, sent_then


@pytest.mark.parametrize(("token", "framing", "status"), [
    (False, "chunked", 401), (False, "content-length", 401),
    (True, "chunked", 411), (True, "content-length", 413)])
def test_a_200_mib_body_is_refused_within_a_second_unread(system, token, framing, status):
    """Without a token: 401 before anything is read. With one, chunked: a length is
    required (Serve's proxy would read ahead of any count in the replica); with a
    Content-Length over the limit: too large, from the header."""
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {API_TOKEN}"} if token else {}),
               **({"Transfer-Encoding": "chunked"} if framing == "chunked"
                  else {"Content-Length": str(BODY)})}
    body = chunked(BODY) if framing == "chunked" else (b" " * MIB for _ in range(200))
    with PeakGrowth(serve_processes()) as growth:
        got, elapsed, sent = upload(system.http_port, headers, body)
    print(f"{framing}: {got} after {elapsed:.3f} s, {sent / MIB:.0f} MiB sent by then, "
          f"largest growth {growth.largest_mib:.1f} MiB")
    assert got == status and elapsed < 1.0
    assert growth.largest_mib < 64, growth.peak


def test_a_language_service_that_is_down_is_503_with_retry_after(system, photo):
    from tests.integration.conftest import png
    from tests.integration.test_system_openai import data_uri

    url = data_uri(png(photo))
    post(system, {"messages": messages(url, "warm"), "max_tokens": 2}).read()
    system.language.proc.kill()
    try:
        response = post(system, {"messages": messages(url, "down?"), "max_tokens": 2})
        error = json.loads(response.read())["error"]
        assert (response.status, error["type"]) == (503, "service_unavailable_error"), error
        assert response.headers["retry-after"] == "1" and "language service" in \
            error["message"]
    finally:
        system.language.start()
    assert settled_health(system.target, SERVING) == SERVING
    wait_for(lambda: post(system, {"messages": messages(url, "up?"),
                                   "max_tokens": 2}).status == 200, 30, "answers again")
