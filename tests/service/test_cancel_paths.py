"""How a call's end travels inward: a client cancel reaches the stream behind the public
port wherever grpc is when it lands (`services.vision.api.relay`), and a language call
that grpc.aio cancels itself at its deadline surfaces as DEADLINE_EXCEEDED, never as a
bare CancelledError (`services.sdk.language.LanguageClient.generate`)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2, language_pb2_grpc
from hero.vision.v1 import vision_pb2, vision_pb2_grpc

from services.sdk.errors import ApiError
from services.sdk.language import LanguageClient
from services.vision.api import add_public_services


class LoopThread:
    """An event loop in a thread of its own, for servers a blocking client talks to."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def serve(add, servicer) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class EndlessStreams:
    """A VisionService whose streams send 16 KiB deltas until they are stopped, waiting
    between them as Serve's proxy waits for the replica; records how each one ended
    ("cancelled": a CancelledError where it waited, which is where Serve's proxy cancels
    the replica's work; "closed": shut at a yield, where nothing is cancelled)."""

    def __init__(self):
        self.ends: dict[str, str] = {}

    async def Generate(self, request, context):
        try:
            while True:
                await asyncio.sleep(0.002)
                yield vision_pb2.GenerateEvent(delta=common_pb2.TextDelta(text="x" * 16384))
        except asyncio.CancelledError:
            self.ends[request.request_id] = "cancelled"
            raise
        except GeneratorExit:
            self.ends[request.request_id] = "closed"
            raise

    Prune = Generate

    async def Check(self, request, context):
        raise NotImplementedError


def test_every_client_cancel_reaches_the_stream_where_it_waits():
    """The client stops reading, so the server blocks writing (flow control), then cancels:
    the cancel lands in grpc's write, and still reaches the stream within a second."""
    thread, streams = LoopThread(), EndlessStreams()
    server, port = thread.run(serve(add_public_services, streams))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            for i in range(10):
                rid = f"cancel-{i}"
                call = stub.Generate(vision_pb2.GenerateRequest(request_id=rid), timeout=30)
                next(call)
                time.sleep(0.2)  # unread: the server's writes fill the window and block
                call.cancel()
                start = time.monotonic()
                while rid not in streams.ends and time.monotonic() - start < 1.0:
                    time.sleep(0.01)
                assert streams.ends.get(rid) == "cancelled", (rid, streams.ends)
    finally:
        thread.run(server.stop(0))
        thread.close()


class ReadingLanguage(language_pb2_grpc.LanguageServiceServicer):
    """Reads a Generate's whole request stream (`pause` seconds per message), then answers
    with its usage."""

    def __init__(self, pause: float = 0.0):
        self.pause = pause

    async def Generate(self, request_iterator, context):
        async for _ in request_iterator:
            await asyncio.sleep(self.pause)
        yield language_pb2.GenerateResponse(usage=common_pb2.Usage())


def tokens(n: int = 1):
    import torch

    from hero_core.packing import PackedTokens

    zero = torch.zeros(n, dtype=torch.int16)
    return PackedTokens(features=torch.zeros(n, 1024), crop=zero, row=zero, col=zero,
                        newline_after=torch.zeros(n, dtype=torch.bool), image_size=(336, 336),
                        grid=(1, 1), side=24, full_tokens=576)


async def outcome(client: LanguageClient, packed, timeout: float | None) -> str:
    """How one generation ended: OK, a status code's name, or CancelledError."""
    try:
        [_ async for _ in client.generate(packed, "hi", dtype="float32", timeout=timeout)]
        return "OK"
    except ApiError as exc:
        return exc.code().name
    except asyncio.CancelledError:
        return "CancelledError"


async def outcomes_of(servicer, packed, timeouts: Callable[[float], list[float]]
                      ) -> dict[str, int]:
    """How generations of `packed` end with the deadlines `timeouts(full)` gives, `full`
    being the shortest time a whole call took."""
    server, port = await serve(language_pb2_grpc.add_LanguageServiceServicer_to_server,
                               servicer)
    client = LanguageClient(f"127.0.0.1:{port}")
    outcomes: dict[str, int] = {}
    try:
        times = []
        for _ in range(5):
            start = time.monotonic()
            assert await outcome(client, packed, None) == "OK"
            times.append(time.monotonic() - start)
        for timeout in timeouts(min(times)):
            name = await outcome(client, packed, timeout)
            outcomes[name] = outcomes.get(name, 0) + 1
    finally:
        await client.close()
        await server.stop(0)
    return outcomes


def test_a_deadline_that_passes_while_tokens_are_sent_is_deadline_exceeded():
    """The server reads slowly, so the client is still writing chunks when the deadline
    passes; grpc.aio itself answers INTERNAL "Internal error from Core" there."""
    outcomes = asyncio.run(outcomes_of(ReadingLanguage(pause=0.02), tokens(4000),
                                       lambda full: [full / 4, full / 3, full / 2]))
    assert outcomes == {"DEADLINE_EXCEEDED": 3}, outcomes


def test_deadlines_shorter_than_a_call_end_it_as_deadline_exceeded():
    """Deadlines anywhere inside a whole call (random, seeded): every call ends OK or
    DEADLINE_EXCEEDED, never INTERNAL, nor as a CancelledError out of `generate` (grpc.aio
    cancels a call itself when its deadline passes while the request stream is being
    half-closed, about 1 call in 100)."""
    rng = random.Random(0)
    outcomes = asyncio.run(outcomes_of(
        ReadingLanguage(pause=0.005), tokens(),
        lambda full: [rng.uniform(0.1, 1.0) * full for _ in range(300)]))
    assert set(outcomes) <= {"OK", "DEADLINE_EXCEEDED"}, outcomes
    assert outcomes.get("DEADLINE_EXCEEDED"), outcomes


class CancelledRead:
    """A call whose read raises CancelledError though nobody cancelled the reader: what
    grpc.aio does to a call whose request stream failed to send."""

    async def read(self):
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    def cancel(self):
        return False


def test_a_call_grpc_cancelled_itself_is_a_status_not_a_cancelled_error(monkeypatch):
    """Past its deadline the call is DEADLINE_EXCEEDED; before it, UNAVAILABLE (retry)."""

    async def run(timeout):
        client = LanguageClient("127.0.0.1:1")
        monkeypatch.setattr(client.stub, "Generate", lambda *a, **k: CancelledRead())
        try:
            return await outcome(client, tokens(), timeout)
        finally:
            await client.close()

    assert asyncio.run(run(0.001)) == "DEADLINE_EXCEEDED"
    assert asyncio.run(run(30.0)) == "UNAVAILABLE"
    assert asyncio.run(run(None)) == "UNAVAILABLE"
