"""The public RPCs of the vision ingress, without Ray: what they check before encoding,
how they report deadlines and language failures, health, and malformed requests."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hero.language.v1 import language_pb2, language_pb2_grpc
from hero.vision.v1 import vision_pb2

from services.common.errors import public_details
from services.common.params import TIMEOUT_HEADER
from services.sdk.vision import generate_request
from services.vision.api import MalformedRequest, lenient
from services.vision.ingress import RequestFailed, VisionIngress
from tests.service.conftest import language_server
from tests.service.vision_harness import Context, InProcessEncoder, png_bytes, vision_config


@pytest.fixture(scope="module")
def strict_language(language_model):
    """A language service with small limits, so a request can exceed them."""
    server = language_server(language_model, limits={"max_new_tokens": 32,
                                                     "max_prompt_tokens": 48})
    yield server
    server.stop()


def run(scenario, encoder_object, redis_url, **config):
    async def main():
        encoder = InProcessEncoder(encoder_object)
        ingress = VisionIngress(encoder, vision_config(redis_url, **config))
        try:
            return await scenario(ingress, encoder)
        finally:
            await ingress.cache.store.close()
            await ingress.language.close()
    return asyncio.run(main())


async def call(ingress: VisionIngress, request, context: Context | None = None
               ) -> tuple[list, Context]:
    """Events of one Generate, and the context with the status it set on failure."""
    context = context or Context()
    events = []
    try:
        async for event in ingress.Generate(request, context):
            events.append(event)
    except Exception:
        assert context.code_set is not None, "a failure must set a status"
    return events, context


@pytest.mark.parametrize("seed, options, message", [
    (101, {"max_new_tokens": 64}, "max_new_tokens must be in 1..32"),
    (102, {"prompt": "describe " * 40}, "max_prompt_tokens=48"),
    (103, {"prompt": None, "messages": [("user", "hi"), ("assistant", "hello")]},
     "must end with a user turn"),
])
def test_a_request_the_language_service_would_refuse_is_refused_before_encoding(
        encoder_object, redis_url, strict_language, seed, options, message):
    async def scenario(ingress, encoder):
        settings = {"prompt": "What is shown?", "max_new_tokens": 8, **options}
        image = png_bytes(seed)  # a new image: a miss
        events, context = await call(ingress, generate_request(image, **settings))
        assert context.code_set == grpc.StatusCode.INVALID_ARGUMENT and not events
        assert message in context.details_set and not encoder.jobs
        events, context = await call(ingress, generate_request(
            image, "What is shown?", max_new_tokens=4))
        assert context.code_set is None, context.details_set
        assert events[-1].HasField("usage")
        assert len(encoder.jobs) == 1
    run(scenario, encoder_object, redis_url,
        language_target=f"127.0.0.1:{strict_language.port}")


def test_health_is_serving_only_while_the_language_service_answers(
        encoder_object, redis_url, strict_language):
    serving = health_pb2.HealthCheckResponse.SERVING

    async def scenario(ingress, encoder):
        ok = await ingress.Check(health_pb2.HealthCheckRequest())
        named = await ingress.Check(health_pb2.HealthCheckRequest(
            service="hero.vision.v1.VisionService"))
        context = Context()
        with pytest.raises(RequestFailed, match="NOT_FOUND: unknown service"):
            await ingress.Check(health_pb2.HealthCheckRequest(service="other.Service"),
                                context)
        return ok.status, named.status, context.code_set

    assert run(scenario, encoder_object, redis_url,
               language_target=f"127.0.0.1:{strict_language.port}") == (
        serving, serving, grpc.StatusCode.NOT_FOUND)

    async def unreachable(ingress, encoder):
        return (await ingress.Check(health_pb2.HealthCheckRequest())).status

    assert run(unreachable, encoder_object, redis_url) == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def test_request_bytes_that_do_not_parse_are_invalid_argument(encoder_object, redis_url):
    parse = lenient(vision_pb2.GenerateRequest)
    good = generate_request(png_bytes(1), "What?")
    assert parse(good.SerializeToString()) == good
    malformed = parse(b"\x0a\xff\xff\xff\xff\x0f")
    assert isinstance(malformed, MalformedRequest)

    async def scenario(ingress, encoder):
        events, context = await call(ingress, malformed)
        return events, context.code_set, context.details_set

    events, code, details = run(scenario, encoder_object, redis_url)
    assert not events and code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid hero.vision.v1.GenerateRequest" in details


def test_error_details_carry_no_object_reprs_or_addresses():
    text = ("failed on <services.x.Thing object at 0x7f3a2b1c9d80> with "
            "<class 'google.protobuf.message.DecodeError'> at 0x7f3a2b1c9d80")
    cleaned = public_details(text)
    assert "0x7f" not in cleaned and "<class" not in cleaned and " object at " not in cleaned
    assert "services.x.Thing" in cleaned and "DecodeError" in cleaned
    assert len(public_details("x" * 5000)) <= 1024


class StallingLanguage(language_pb2_grpc.LanguageServiceServicer):
    """A language service that takes the header, then either stops reading (the upload
    stalls) or fails UNAVAILABLE just before the caller's deadline."""

    def __init__(self, mode: str):
        self.mode, self.calls = mode, 0

    async def Validate(self, request, context):
        return language_pb2.ValidateResponse()

    async def Generate(self, request_iterator, context):
        self.calls += 1
        await request_iterator.__anext__()
        if self.mode == "stall":
            await asyncio.sleep(30)
        remaining = context.time_remaining() or 1.0
        await asyncio.sleep(max(remaining - 0.1, 0.0))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield  # pragma: no cover


@pytest.mark.parametrize("mode", ["stall", "unavailable_at_deadline"])
def test_a_deadline_is_deadline_exceeded_and_never_followed_by_a_retry(
        encoder_object, redis_url, mode):
    async def main():
        fake = StallingLanguage(mode)
        server = grpc.aio.server()
        language_pb2_grpc.add_LanguageServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ingress = VisionIngress(InProcessEncoder(encoder_object), vision_config(
            redis_url, language_target=f"127.0.0.1:{port}", language_retries=3,
            language_backoff_s=0.3))
        try:
            # the full grid at retention 1.0: hundreds of kilobytes to upload
            request = generate_request(png_bytes(900 + len(mode)), "What?", method="full",
                                       retention=1.0)
            start = time.monotonic()
            events, context = await call(ingress, request, Context({TIMEOUT_HEADER: "1500"}))
            return fake.calls, context.code_set, time.monotonic() - start, events
        finally:
            await server.stop(0)
            await ingress.cache.store.close()
            await ingress.language.close()

    calls, code, elapsed, events = asyncio.run(main())
    assert calls == 1, "a retry was sent although the deadline allowed none"
    assert elapsed < 3.0 and len(events) == 1  # accepted, then the failure
    expected = {"stall": grpc.StatusCode.DEADLINE_EXCEEDED,
                "unavailable_at_deadline": grpc.StatusCode.UNAVAILABLE}[mode]
    assert code == expected


def test_the_proxy_message_bound_follows_the_image_limit():
    from services.vision.config import VisionConfig

    config = VisionConfig(max_image_bytes=8 << 20)
    bound = int(config.proxy_env()["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])
    request = generate_request(b"\xff" * (8 << 20), "x" * config.max_prompt_chars)
    assert request.ByteSize() < bound < (9 << 20)


def test_every_error_the_ingress_raises_survives_pickling():
    """Ray Serve pickles a replica's exception to the proxy; one that cannot be rebuilt
    reaches the client as INTERNAL with Ray's reprs in the details."""
    import pickle

    from services.common.errors import (
        DeadlineError,
        OverloadedError,
        UnavailableError,
        UpstreamError,
    )
    from services.vision.ingress import ServiceNotFoundError
    from services.vision.tokens import ImageNotFoundError

    for exc in (UpstreamError(grpc.StatusCode.UNAVAILABLE, "language service: gone"),
                ServiceNotFoundError("x"), ImageNotFoundError("y"), DeadlineError("z"),
                OverloadedError("o"), UnavailableError("u"),
                RequestFailed(grpc.StatusCode.INTERNAL, "internal error (request id 1)")):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)
        assert getattr(again, "code", None) == getattr(exc, "code", None)


class CountingLanguage(language_pb2_grpc.LanguageServiceServicer):
    def __init__(self):
        self.calls = 0

    async def GetModelInfo(self, request, context):
        self.calls += 1
        return language_pb2.ModelInfo(model="fake")


@pytest.mark.parametrize("policy", ["round_robin", "pick_first"])
def test_language_calls_from_one_vision_replica_spread_over_the_servers(policy):
    """As in Kubernetes, where the headless Service resolves to every language pod: the
    vision service's client balances call by call (pick_first, for contrast, does not)."""
    from services.vision.config import VisionConfig
    from services.vision.pipeline import language_client

    async def main():
        servers, fakes, ports = [], [], []
        for _ in range(3):
            fake, server = CountingLanguage(), grpc.aio.server()
            language_pb2_grpc.add_LanguageServiceServicer_to_server(fake, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
            fakes.append(fake)
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        client = language_client(VisionConfig(language_target=target,
                                              language_lb_policy=policy))
        try:
            for _ in range(12):
                await client.model_info(timeout=10)
        finally:
            await client.close()
            for server in servers:
                await server.stop(0)
        return [f.calls for f in fakes]

    calls = asyncio.run(main())
    assert sum(calls) == 12
    if policy == "round_robin":
        assert min(calls) >= 3, calls
    else:
        assert sorted(calls) == [0, 0, 12], calls


def test_the_language_service_requires_the_token_it_is_given_and_the_vision_sends_it(
        encoder_object, redis_url, language_model, monkeypatch):
    """One bearer-token check for both services (services.common.auth): with tokens
    configured, LanguageService calls without one are UNAUTHENTICATED (health is not),
    and the vision service's client sends the one it is given."""
    from grpc_health.v1 import health_pb2_grpc

    from services.sdk.errors import ApiError
    from services.sdk.language import LanguageClient

    monkeypatch.setenv("HERO_LANGUAGE_API_TOKENS", "old-token,internal-token")
    server = language_server(language_model)
    target = f"127.0.0.1:{server.port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def calls(token):
            client = LanguageClient(target, token=token)
            try:
                await client.model_info(timeout=10)
                await client.validate("What is shown?", timeout=10)
                return "OK"
            except ApiError as exc:  # the SDK's typed errors
                return exc.code()
            finally:
                await client.close()

        assert asyncio.run(calls(None)) == grpc.StatusCode.UNAUTHENTICATED
        assert asyncio.run(calls("wrong")) == grpc.StatusCode.UNAUTHENTICATED
        assert asyncio.run(calls("internal-token")) == "OK"

        async def vision_health(ingress, encoder):
            return (await ingress.Check(health_pb2.HealthCheckRequest())).status

        for token, status in (("", health_pb2.HealthCheckResponse.NOT_SERVING),
                              ("internal-token", health_pb2.HealthCheckResponse.SERVING)):
            monkeypatch.setenv("HERO_VISION_LANGUAGE_TOKEN", token)
            assert run(vision_health, encoder_object, redis_url,
                       language_target=target) == status
    finally:
        server.stop()
