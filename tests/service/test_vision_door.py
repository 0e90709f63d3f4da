"""What the vision ingress answers to hostile calls before it does any work: metadata
parsed only after the bearer token, every field bounded with INVALID_ARGUMENT naming the
field and its limit, and no status but INTERNAL "internal error (request id ...)" for
anything unexpected. Without Ray: the ingress object, called as Serve calls it."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from hero.common.v1 import tensor_pb2 as common_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hero_core.cache import EntryShape, EntrySpec
from hero_core.tiling import TilingSpec
from services.common.params import MAX_ROLE_CHARS, MAX_TIMEOUT_MS, TIMEOUT_HEADER
from services.sdk.vision import generate_request, prune_request
from services.vision.ingress import RequestFailed, VisionIngress
from tests.service.vision_harness import Context, png_bytes, vision_config

TOKEN = "door-token"
AUTH = ("authorization", f"Bearer {TOKEN}")


class PairsContext(Context):
    """A context whose metadata may repeat keys, as a real call's may."""

    def __init__(self, pairs: list[tuple[str, str]]):
        super().__init__()
        self.pairs = pairs

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.pairs)


class FailingEncoder:
    """An encoder client whose every call but `spec` fails with internals in its
    message."""

    async def spec(self):
        return EntrySpec("failing", TilingSpec(), EntryShape(64, torch.float32, 64, 1 << 24))

    async def encode(self, request):
        raise RuntimeError("replica pid=4242 at /opt/venv/lib/site-packages/x.py: "
                           "<ray.Thing object at 0x7f3a2b1c9d80>")

    async def embed_question(self, question):
        raise RuntimeError("not expected")


@pytest.fixture(scope="module")
def door(tiny_dir):
    """(event loop, ingress requiring TOKEN) over an in-memory cache and an encoder that
    fails: nothing a rejected request does may reach either."""
    loop = asyncio.new_event_loop()

    async def make():
        return VisionIngress(FailingEncoder(), vision_config("memory://", api_tokens=TOKEN))

    ingress = loop.run_until_complete(make())
    yield loop, ingress
    loop.run_until_complete(ingress.language.close())
    loop.close()


def outcome(door, rpc: str, request, pairs) -> tuple[grpc.StatusCode | None, str]:
    """The status a call sets (None when it streams to the end) and its details. Only a
    `RequestFailed` may leave the RPC."""
    loop, ingress = door
    context = PairsContext(pairs)

    async def run():
        try:
            if rpc == "Check":
                await ingress.Check(request, context)
            else:
                async for _ in getattr(ingress, rpc)(request, context):
                    pass
        except RequestFailed as exc:
            assert (exc.code, exc.details) == (context.code_set, context.details_set)
    loop.run_until_complete(run())
    return context.code_set, context.details_set


def bad_params_request():
    """Valid except max_new_tokens=0, so a valid header leads to that field's error."""
    return generate_request(png_bytes(1, (64, 48)), "What?", max_new_tokens=0)


HOSTILE_TIMEOUTS = {
    "4301 digits": ["9" * 4301],
    "1 and 320 zeros": ["1" + "0" * 320],
    "negative": ["-5"],
    "fraction": ["1.5"],
    "exponent": ["1e3"],
    "nan": ["NaN"],
    "inf": ["inf"],
    "arabic-indic digits": ["\u0661\u0662\u0663"],
    "superscript two": ["\u00b2"],
    "spaces": [" 10 "],
    "empty": [""],
    "past the limit": [str(MAX_TIMEOUT_MS + 1)],
    "repeated": ["10", "20"],
}


@pytest.mark.parametrize("values", HOSTILE_TIMEOUTS.values(), ids=HOSTILE_TIMEOUTS.keys())
def test_a_hostile_timeout_header_is_invalid_argument_but_only_after_the_token(door, values):
    headers = [(TIMEOUT_HEADER, v) for v in values]
    for rpc, request in (("Generate", bad_params_request()),
                         ("Prune", prune_request(png_bytes(1, (64, 48)), "What?"))):
        code, details = outcome(door, rpc, request, headers)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (rpc, details)
        code, details = outcome(door, rpc, request, [AUTH, *headers])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, details)
        assert TIMEOUT_HEADER in details and f"0..{MAX_TIMEOUT_MS}" in details
        assert len(details) < 400 and "Traceback" not in details


def valid_timeout(values: list[str]) -> bool:
    """The header's contract: absent, or once as ASCII digits (at most 8) up to the max."""
    if not values:
        return True
    value = values[0]
    return (len(values) == 1 and value.isascii() and value.isdigit() and len(value) <= 8
            and int(value) <= MAX_TIMEOUT_MS)


TIMEOUT_TEXT = st.one_of(
    st.text(max_size=24),
    st.integers(-10 ** 400, 10 ** 400).map(str),
    st.integers(0, MAX_TIMEOUT_MS + 10).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="0123456789", min_size=1, max_size=5000),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=12))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.lists(TIMEOUT_TEXT, max_size=3))
def test_any_timeout_header_gives_a_clear_invalid_argument(door, values):
    """Whatever the header holds, the answer is INVALID_ARGUMENT: about the header when it
    breaks the contract, else about the request's own bad field."""
    code, details = outcome(door, "Generate", bad_params_request(),
                            [AUTH, *((TIMEOUT_HEADER, v) for v in values)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    if valid_timeout(values):
        assert "max_new_tokens must be in" in details
    else:
        assert TIMEOUT_HEADER in details


def test_a_timeout_of_zero_is_deadline_exceeded_before_any_work(door):
    request = generate_request(png_bytes(2, (64, 48)), "What?", max_new_tokens=4)
    code, details = outcome(door, "Generate", request, [AUTH, (TIMEOUT_HEADER, "0")])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and TIMEOUT_HEADER in details


def test_a_repeated_or_second_authorization_is_not_a_token(door):
    request = bad_params_request()
    assert outcome(door, "Generate", request, [AUTH, AUTH])[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert outcome(door, "Generate", request, [("authorization", "Bearer x"), AUTH])[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert outcome(door, "Generate", request, [AUTH])[0] == grpc.StatusCode.INVALID_ARGUMENT


def chat(*messages: tuple[str, str], **options):
    return generate_request(png_bytes(3, (64, 48)), None, messages=list(messages), **options)


EIGHT_MIB_ROLE = "r" * (8 << 20)
OVERSIZED = {
    "8 MiB role": ("Generate", chat((EIGHT_MIB_ROLE, "hi"), ("user", "What?")),
                   [r"chat\.messages\[0\]\.role", f"limit of {MAX_ROLE_CHARS}"]),
    "role of 17": ("Generate", chat(("user", "a"), ("u" * 17, "What?")),
                   [r"chat\.messages\[1\]\.role", f"limit of {MAX_ROLE_CHARS}"]),
    "65 messages": ("Generate", chat(*[("user", "q")] * 65), ["65 messages", "at most 64"]),
    "long request_id": ("Generate", generate_request(png_bytes(3), "q", request_id="i" * 129),
                        ["request_id is 129 characters", "limit of 128"]),
    "control character in request_id": (
        "Prune", prune_request(png_bytes(3), request_id="a\nb"),
        ["request_id must be printable ASCII"]),
    "long method": ("Prune", prune_request(png_bytes(3), method="m" * 65),
                    [r"prune\.method is 65 characters", "limit of 64"]),
    "9 stop strings": ("Generate", generate_request(png_bytes(3), "q", stop=["s"] * 9),
                       ["stop takes at most 8"]),
    "long stop string": ("Generate", generate_request(png_bytes(3), "q", stop=["s" * 65]),
                         ["of at most 64 characters"]),
    "long prompt": ("Generate", generate_request(png_bytes(3), "q" * 16385),
                    ["max_prompt_chars=16384"]),
    "long question": ("Prune", prune_request(png_bytes(3), "q" * 16385),
                      ["max_prompt_chars=16384"]),
    "8 MiB image id": ("Prune", prune_request(None, image_id="a" * (8 << 20)),
                       ["image_id must be the 64-hex-digit id"]),
    "nan temperature": ("Generate", generate_request(png_bytes(3), "q",
                                                     temperature=float("nan")),
                        [r"temperature must be in \[0, 2\]"]),
}


@pytest.mark.parametrize("rpc, request_, expected", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_every_field_is_bounded_at_the_door_naming_the_field_and_limit(door, rpc, request_,
                                                                       expected):
    code, details = outcome(door, rpc, request_, [AUTH])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    for pattern in expected:
        assert re.search(pattern, details), (pattern, details)
    assert len(details) <= 1024


def test_an_unexpected_failure_is_internal_with_only_the_request_id(door, caplog):
    request = prune_request(png_bytes(4, (64, 48)), "", request_id="rid-7")
    code, details = outcome(door, "Prune", request, [AUTH])
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error (request id rid-7)")
    assert any("rid-7" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_failing_health_check_is_internal_with_only_its_id(door, monkeypatch):
    _, ingress = door

    async def broken(timeout=None):
        raise RuntimeError("channel state at 0x7f3a2b1c9d80")

    monkeypatch.setattr(ingress.language, "model_info", broken)
    monkeypatch.setattr(ingress.pipeline, "_reachable", (0.0, False))
    code, details = outcome(door, "Check", health_pb2.HealthCheckRequest(), [])
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error (request id health)")


def tokens_for(ingress):
    """Pruned tokens of the smallest layout, as `TokenSource.cached` returns them."""
    from services.language.model import smallest_packed
    from services.vision.tokens import Tokens

    packed = smallest_packed(TilingSpec(), 64)
    return Tokens(packed, "0" * 64, True, 1.0, 0.0)


def test_a_cancelled_error_at_the_deadline_is_deadline_exceeded(door, monkeypatch):
    """grpc.aio raises CancelledError out of a language call whose deadline passes while its
    request stream closes; nobody cancelled the RPC, so its status is DEADLINE_EXCEEDED."""
    _, ingress = door

    async def tokens(*args, **kwargs):
        return tokens_for(ingress)

    async def generate(*args, **kwargs):
        await asyncio.sleep(0.1)
        raise asyncio.CancelledError()
        yield common_pb2.TextDelta()  # pragma: no cover

    monkeypatch.setattr(ingress.source, "cached", tokens)
    monkeypatch.setattr(ingress.language, "generate", generate)
    code, details = outcome(door, "Generate", generate_request(png_bytes(5), "What?"),
                            [AUTH, (TIMEOUT_HEADER, "20")])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details


def test_a_cancel_of_the_call_still_cancels_it(door, monkeypatch):
    loop, ingress = door
    started = asyncio.Event()

    async def tokens(*args, **kwargs):
        return tokens_for(ingress)

    async def generate(*args, **kwargs):
        started.set()
        await asyncio.sleep(30)
        yield common_pb2.TextDelta()  # pragma: no cover

    monkeypatch.setattr(ingress.source, "cached", tokens)
    monkeypatch.setattr(ingress.language, "generate", generate)
    context = PairsContext([AUTH, (TIMEOUT_HEADER, "10")])

    async def run():
        async def consume():
            async for _ in ingress.Generate(generate_request(png_bytes(5), "What?"), context):
                pass
        task = asyncio.ensure_future(consume())
        await started.wait()
        await asyncio.sleep(0.05)  # past the deadline, and then the call is cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    loop.run_until_complete(run())
    assert context.code_set is None
