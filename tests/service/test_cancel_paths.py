"""How a call's end travels inward: a client cancel reaches the stream behind the public
port wherever grpc is when it lands (`services.vision.api.relay`), and a language call
that grpc.aio cancels itself at its deadline surfaces as DEADLINE_EXCEEDED, never as a
bare CancelledError (`services.sdk.language.LanguageClient.generate`)."""

from __future__ import annotations

import asyncio
import random
import statistics
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
    """Reads a Generate's whole request stream, then answers with its usage."""

    async def Generate(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        yield language_pb2.GenerateResponse(usage=common_pb2.Usage())


def one_token():
    import torch

    from hero_core.packing import PackedTokens

    zero = torch.zeros(1, dtype=torch.int16)
    return PackedTokens(features=torch.zeros(1, 1024), crop=zero, row=zero, col=zero,
                        newline_after=torch.zeros(1, dtype=torch.bool), image_size=(336, 336),
                        grid=(1, 1), side=24, full_tokens=576)


async def outcome(client: LanguageClient, packed, timeout: float) -> str:
    """How one generation ended: OK, a status code's name, or CancelledError."""
    try:
        [_ async for _ in client.generate(packed, "hi", dtype="float32", timeout=timeout)]
        return "OK"
    except ApiError as exc:
        return exc.code().name
    except asyncio.CancelledError:
        return "CancelledError"


async def race_deadlines(enough: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Outcomes of generations with deadlines shorter than a whole call (random, seeded),
    until `enough(outcomes)` or 5,000 calls."""
    server, port = await serve(language_pb2_grpc.add_LanguageServiceServicer_to_server,
                               ReadingLanguage())
    client, packed = LanguageClient(f"127.0.0.1:{port}"), one_token()
    outcomes: dict[str, int] = {}
    try:
        times = []
        for _ in range(15):
            start = time.monotonic()
            await outcome(client, packed, 10)
            times.append(time.monotonic() - start)
        full, rng = statistics.median(times), random.Random(0)
        for _ in range(5000):
            name = await outcome(client, packed, rng.uniform(0.1, 1.0) * full)
            outcomes[name] = outcomes.get(name, 0) + 1
            if enough(outcomes):
                break
    finally:
        await client.close()
        await server.stop(0)
    return outcomes


def test_a_language_call_cancelled_by_grpc_at_its_deadline_is_deadline_exceeded(
        monkeypatch):
    """grpc.aio cancels a call itself when its deadline passes while the request stream is
    being half-closed, and the read raises CancelledError (about 1 call in 100 with
    deadlines shorter than the call). Calls run until that has happened a few times: none
    may leave `generate` as a CancelledError, each is DEADLINE_EXCEEDED."""
    import services.sdk.language as sdk

    taken: list[grpc.StatusCode] = []
    original = getattr(sdk, "broken_stream", None)

    def spy(deadline):
        error = original(deadline)
        taken.append(error.code())
        return error

    monkeypatch.setattr(sdk, "broken_stream", spy, raising=False)
    outcomes = asyncio.run(race_deadlines(
        lambda seen: len(taken) >= 3 or "CancelledError" in seen))
    assert set(outcomes) <= {"OK", "DEADLINE_EXCEEDED", "INTERNAL"}, outcomes
    assert taken and set(taken) == {grpc.StatusCode.DEADLINE_EXCEEDED}, (taken, outcomes)
