"""The OpenAI-compatible API's parts without Ray: request bodies to `GenerateRequest`s,
image_url forms, pipeline events to completions and chunks, failures to HTTP statuses,
and the body limit and route checks of the handler (with an in-process pipeline)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import pytest
import torch
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2
from starlette.requests import Request

from hero_core.errors import InvalidInputError, PromptTooLongError
from hero_core.packing import PackedTokens
from hero_core.tiling import TilingSpec, plan_grid
from hero_core.viz import tile_boxes
from services.common.auth import BearerTokens
from services.common.errors import (
    DeadlineError,
    NotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
    UpstreamError,
)
from services.vision.config import VisionConfig
from services.vision.openai.convert import conversation, generate_request, generation_params
from services.vision.openai.errors import ModelNotFoundError, body_too_large, describe
from services.vision.openai.http import OpenAIApi
from services.vision.openai.images import allowed_host, decode_data_uri, image_input
from services.vision.openai.responses import Answer, collect, stream
from services.vision.openai.schema import parse_request
from services.vision.playground import assets
from services.vision.tokens import Tokens

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGE_ID = "ab" * 32
CONFIG = VisionConfig.load(values={"allow_unauthenticated": True})


def body(*messages: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({"messages": list(messages), **fields}).encode()


def user(*parts: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def image(url: str = URI) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def converted(raw: bytes, config: VisionConfig = CONFIG) -> vision_pb2.GenerateRequest:
    return asyncio.run(generate_request(parse_request(raw), config, "r1"))


# ---- request bodies ---------------------------------------------------------------------

def test_a_conversation_becomes_chat_turns_with_the_image_bytes_and_settings():
    raw = body({"role": "developer", "content": "Be brief."},
               user(image(), "What is it?", "Answer in a word."),
               {"role": "assistant", "content": "A cat."}, user("And its colour?"),
               max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, seed=3,
               stop="END", hero={"method": "full", "retention": 1.0}, ignore_eos=True,
               logprobs=False, user="someone")  # unknown fields are ignored
    request = converted(raw)
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "Be brief."), ("user", "What is it?\nAnswer in a word."),
        ("assistant", "A cat."), ("user", "And its colour?")]
    assert request.image.data == PNG and request.request_id == "r1"
    assert (request.prune.method, request.prune.retention) == ("full", 1.0)
    params = request.params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed,
            list(params.stop), params.ignore_eos) == (7, 0.0, 0.5, 3, ["END"], True)


def test_unset_sampling_follows_openai_defaults_and_the_configured_length():
    params = generation_params(parse_request(body(user(image(), "q"))), CONFIG)
    assert (params.temperature, params.top_p, params.seed) == (1.0, 1.0, 0)
    assert params.max_new_tokens == CONFIG.openai.default_max_tokens
    legacy = generation_params(parse_request(body(user(image(), "q"), max_tokens=5)), CONFIG)
    assert legacy.max_new_tokens == 5


def test_an_image_id_url_names_a_cached_image():
    request = converted(body(user(image(f"hero-image://{IMAGE_ID}"), "q")))
    assert request.image.WhichOneof("source") == "image_id"
    assert request.image.image_id == IMAGE_ID


@pytest.mark.parametrize("raw, param, words", [
    (body(), "messages", "at least 1 item"),
    (body(user({"type": "input_audio", "input_audio": {}})), "messages[0].content[0]",
     "'input_audio'"),
    (body(user({"type": "image_url", "image_url": {}})),
     "messages[0].content[0].image_url.url", "Field required"),
    (body(user(image(), "q"), temperature=2.5), "temperature", "less than or equal to 2"),
    (body(user(image(), "q"), top_p=0), "top_p", "greater than 0"),
    (body(user(image(), "q"), max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (body(user(image(), "q"), seed=-1), "seed", "greater than or equal to 0"),
    (body(user(image(), "q"), stop=3), "stop", "valid string, or a valid array"),
    (body(user(image(), "q"), hero={"retention": 1.5}), "hero.retention", "less than"),
    (body(user(image(), "q"), hero={"metod": "hero"}), "hero.metod", "Extra inputs"),
])
def test_a_bad_field_is_named_without_echoing_its_value(raw, param, words):
    with pytest.raises(InvalidInputError) as info:
        parse_request(raw)
    assert info.value.param == param and words in str(info.value), str(info.value)
    assert URI[30:60] not in str(info.value)


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not valid JSON"),
    (body(user("q")), "has 0"),
    (body(user(image(), image(), "q")), "has 2"),
    (body(user(image(), "q"), user(image(), "q2")), "has 2"),
    (body({"role": "system", "content": [image()]}, user("q")), "first user message"),
    (body(user("q"), {"role": "assistant", "content": "a"}, user(image(), "q2")),
     "first user message"),
    (body({"role": "tool", "content": "x"}, user(image(), "q")), "'tool' is not supported"),
    (body(user(image(), "q"), n=2), "n must be 1"),
    (body(user(image("data:image/png;base64,###"), "q")), "not valid base64"),
    (body(user(image("data:text/plain;base64,aGk="), "q")), "data:image/<type>;base64"),
    (body(user(image("hero-image://xyz"), "q")), "64-hex-digit"),
    (body(user(image("file:///etc/passwd"), "q")), "http(s) URL of an allowed host"),
    (body(user(image("http://169.254.169.254/latest/meta-data"), "q")),
     "openai.image_url_hosts does not list it"),
])
def test_requests_this_endpoint_cannot_serve_are_refused_with_a_reason(raw, words):
    with pytest.raises(InvalidInputError) as info:
        converted(raw)
    assert words in str(info.value), str(info.value)


def test_a_data_uri_over_the_image_limit_is_refused_before_it_is_decoded():
    payload = "A" * 4_000  # 3,000 bytes once decoded
    with pytest.raises(InvalidInputError, match="above max_image_bytes=1000"):
        decode_data_uri("data:image/png;base64," + payload, 1000)
    assert decode_data_uri(URI, len(PNG)) == PNG
    with pytest.raises(InvalidInputError, match="above max_image_bytes"):
        decode_data_uri(URI, len(PNG) - 1)


def test_remote_hosts_are_fetched_only_when_listed():
    assert not allowed_host("http://example.com/a.png", [])
    assert allowed_host("https://Images.Example.com/a.png", ["images.example.com"])
    assert allowed_host("http://127.0.0.1:8080/a.png", ["127.0.0.1:8080"])
    assert not allowed_host("http://127.0.0.1:8081/a.png", ["127.0.0.1:8080"])
    assert not allowed_host("http://images.example.com.evil.net/a.png",
                            ["images.example.com"])
    assert not allowed_host("http://user@evil.net/@images.example.com", ["images.example.com"])
    config = VisionConfig.load(values={"allow_unauthenticated": True,
                                       "openai": {"image_url_hosts": ["other.example"]}})
    with pytest.raises(InvalidInputError, match="does not list it"):
        asyncio.run(image_input("https://example.com/a.png", config))


def test_conversation_keeps_text_only_turns_around_the_image():
    turns, url = conversation(parse_request(body(
        {"role": "system", "content": "s"}, user("before", image(), "after"))).messages)
    assert turns == [("system", "s"), ("user", "before\nafter")] and url == URI


# ---- answers ----------------------------------------------------------------------------

ACCEPTED = vision_pb2.Accepted(image_id=IMAGE_ID, cache_hit=True, tokens_kept=320,
                               tokens_total=2928)


def usage_event(reason: int = common_pb2.FINISH_REASON_EOS) -> vision_pb2.GenerateEvent:
    return vision_pb2.GenerateEvent(usage=vision_pb2.VisionUsage(
        language=common_pb2.Usage(prompt_tokens=391, visual_tokens=365, completion_tokens=2,
                                  decode_tokens_per_s=40.0, finish_reason=reason),
        vision_ms=5.0, ttft_ms=9.0, bytes_sent=1234))


def delta(text: str) -> vision_pb2.GenerateEvent:
    return vision_pb2.GenerateEvent(delta=common_pb2.TextDelta(text=text, token_ids=[1]))


async def events_of(*events: Any):
    for event in events:
        if isinstance(event, BaseException):
            raise event
        yield event


def sse(answer: Answer, *events: Any, include_usage: bool = True) -> tuple[list[Any], list]:
    ended: list[str] = []

    async def main() -> bytes:
        return b"".join([part async for part in stream(answer, events_of(*events),
                                                        include_usage, ended.append)])
    text = asyncio.run(main()).decode()
    assert text.endswith("data: [DONE]\n\n")
    items = [json.loads(line[6:]) for line in text.split("\n\n")
             if line.startswith("data: {")]
    return items, ended


def test_a_stream_is_role_chunk_deltas_finish_usage_then_done():
    answer = Answer("r1", "tiny", ACCEPTED)
    chunks, ended = sse(answer, delta("Hel"), delta(""), delta("lo"),
                        usage_event(common_pb2.FINISH_REASON_LENGTH))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["hero"]["image_id"] == IMAGE_ID and chunks[0]["hero"]["cache_hit"]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 393
    assert chunks[4]["usage"]["hero"]["visual_tokens_kept"] == 320
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"} and ended == ["OK"]
    without, _ = sse(answer, delta("a"), usage_event(), include_usage=False)
    assert "usage" not in without[-1] and without[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_failure_after_the_stream_started_is_an_error_event():
    chunks, ended = sse(Answer("r1", "tiny", ACCEPTED), delta("a"),
                        UpstreamError(grpc.StatusCode.UNAVAILABLE, "language service: gone"))
    assert chunks[-1]["error"]["code"] == "unavailable"
    assert "gone" in chunks[-1]["error"]["message"] and ended == ["UNAVAILABLE"]


def test_a_completion_has_the_text_usage_and_hero_figures():
    async def main():
        return await collect(events_of(delta("Hel"), delta("lo"), usage_event()))
    text, usage = asyncio.run(main())
    done = Answer("r1", "tiny", ACCEPTED).completion(text, usage)
    assert done["object"] == "chat.completion" and done["model"] == "tiny"
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert done["choices"][0]["finish_reason"] == "stop"
    assert (done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]) == (391, 2)
    assert done["usage"]["hero"]["image_url"] == f"hero-image://{IMAGE_ID}"
    # the playground's figures: the pipeline's VisionUsage and the decode speed
    hero = done["usage"]["hero"]
    assert (hero["vision_ms"], hero["ttft_ms"], hero["bytes_sent"],
            hero["decode_tokens_per_s"]) == (5.0, 9.0, 1234, 40.0)


# ---- failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc, status, kind, code", [
    (InvalidInputError("bad"), 400, "invalid_request_error", "invalid_argument"),
    (PromptTooLongError("long"), 400, "invalid_request_error", "invalid_argument"),
    (UnauthenticatedError("who"), 401, "authentication_error", "unauthenticated"),
    (NotFoundError("gone"), 404, "not_found_error", "not_found"),
    (ModelNotFoundError("m"), 404, "not_found_error", "model_not_found"),
    (body_too_large(10, 11), 413, "invalid_request_error", "request_too_large"),
    (OverloadedError("busy"), 429, "rate_limit_error", "resource_exhausted"),
    (UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue"), 429, "rate_limit_error",
     "resource_exhausted"),
    (UnavailableError("down"), 503, "service_unavailable_error", "unavailable"),
    (DeadlineError("late"), 504, "timeout_error", "deadline_exceeded"),
    (RuntimeError("secret internals"), 500, "server_error", "internal"),
])
def test_failures_map_to_the_status_and_error_object_clients_expect(exc, status, kind, code):
    got, headers, raw, _ = describe(exc, "rid")
    error = json.loads(raw)["error"]
    assert (got, error["type"], error["code"]) == (status, kind, code)
    assert ("retry-after" in headers) == (status in (429, 503))
    assert "secret" not in error["message"]


# ---- the handler ------------------------------------------------------------------------

class CannedPipeline:
    """A `VisionPipeline` with a canned answer, recording the requests it gets."""

    def __init__(self):
        self.requests: list[Any] = []

    async def generate(self, request, *, deadline, request_id):
        self.requests.append(request)
        yield vision_pb2.GenerateEvent(accepted=ACCEPTED)
        yield delta("hi")
        yield usage_event()

    async def selection(self, request, *, deadline):
        self.requests.append(request)
        return Tokens(packed=SELECTION, image_id=IMAGE_ID, cache_hit=True, vision_ms=1.0,
                      queue_ms=0.0)

    async def tiling(self) -> TilingSpec:
        return TilingSpec()


class Door:
    """What OpenAIApi needs of the ingress: its config, tokens, metrics and pipeline."""

    def __init__(self, tokens: str = ""):
        self.config = CONFIG.model_copy(update={"max_image_bytes": 3000,
                                                "max_prompt_chars": 100})
        self.auth = BearerTokens([tokens] if tokens else [])
        self.pipeline = CannedPipeline()

        class Counter:
            def inc(self, *_: Any, **__: Any) -> None:
                pass

        self.metrics = type("Metrics", (), {"requests": Counter()})()


def call(api: OpenAIApi, method: str, path: str, chunks: list[bytes],
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, body chunks the handler read) of one request."""
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        if read > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[read - 1],
                "more_body": read < len(chunks)}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    response = asyncio.run(api(Request(scope, receive)))
    return (response.status_code, dict(response.headers), json.loads(response.body), read)


def test_the_token_is_checked_before_the_body_is_read():
    api = OpenAIApi(Door(tokens="secret"))
    status, headers, answer, read = call(api, "POST", "/v1/chat/completions", [b"x" * 100])
    assert (status, answer["error"]["type"], read) == (401, "authentication_error", 0)
    assert headers["connection"] == "close"
    status, _, _, _ = call(api, "GET", "/v1/models", [], {"authorization": "Bearer nope"})
    assert status == 401


def test_a_body_over_the_limit_is_refused_from_its_length_or_as_it_arrives():
    door = Door()
    api, limit = OpenAIApi(door), door.config.max_http_body_bytes
    status, _, answer, read = call(api, "POST", "/v1/chat/completions", [b"{}"],
                                   {"content-length": str(limit + 1)})
    assert (status, answer["error"]["code"], read) == (413, "request_too_large", 0)
    status, _, answer, read = call(api, "POST", "/v1/chat/completions", [b"{}"],
                                   {"transfer-encoding": "chunked"})
    assert (status, answer["error"]["code"], read) == (411, "length_required", 0)
    # more bytes than the length said (a front end that changed the framing): counted
    chunks = [b" " * 4096] * (limit // 4096 + 50)
    status, _, answer, read = call(api, "POST", "/v1/chat/completions", chunks,
                                   {"content-length": "100"})
    assert (status, answer["error"]["code"]) == (413, "request_too_large")
    assert read == limit // 4096 + 1  # stopped at the first chunk past the limit
    status, _, answer, _ = call(api, "POST", "/v1/chat/completions", [b"{}"],
                                {"content-length": "1e9"})
    assert (status, answer["error"]["code"]) == (400, "invalid_content_length")
    assert not door.pipeline.requests


def test_routes_models_and_an_answer_through_the_pipeline():
    door = Door(tokens="secret")
    api, auth = OpenAIApi(door), {"authorization": "Bearer secret"}
    status, _, models, _ = call(api, "GET", "/v1/models", [], auth)
    assert status == 200 and models["data"][0]["id"] == "tiny"
    assert "hero" in models["data"][0]["hero"]["methods"]
    assert call(api, "GET", "/v1/models/tiny", [], auth)[2]["id"] == "tiny"
    assert call(api, "GET", "/v1/models/other", [], auth)[0] == 404
    assert call(api, "GET", "/v1/chat/completions", [], auth)[0] == 405
    assert call(api, "POST", "/v1/embeddings", [b"{}"], auth)[2]["error"]["code"] == \
        "unknown_url"
    raw = body(user(image(), "q"), model="tiny")
    status, headers, done, _ = call(api, "POST", "/v1/chat/completions", [raw],
                                    {**auth, "content-length": str(len(raw))})
    assert status == 200 and done["choices"][0]["message"]["content"] == "hi"
    assert headers["x-hero-image-id"] == IMAGE_ID and headers["x-hero-cache-hit"] == "true"
    assert door.pipeline.requests[0].image.data == PNG
    raw = body(user(image(), "q"), model="gpt-4o")
    status, _, error, _ = call(api, "POST", "/v1/chat/completions", [raw],
                               {**auth, "content-length": str(len(raw))})
    assert (status, error["error"]["code"]) == (404, "model_not_found")


def page(api: OpenAIApi, path: str, headers: dict[str, str] | None = None):
    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    return asyncio.run(api(Request(scope, receive)))


def test_the_playground_page_and_its_files_are_served_without_a_token():
    api = OpenAIApi(Door(tokens="secret"))
    index = page(api, "/")
    assert index.status_code == 200
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert b'src="/playground/playground.js"' in index.body
    assert "default-src 'self'" in index.headers["content-security-policy"]
    script = page(api, "/playground/playground.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"/v1/hero/layout" in script.body and b"localStorage" not in script.body
    assert page(api, "/playground/playground.css").headers["content-type"] == \
        "text/css; charset=utf-8"
    # every file the page names is served; nothing else under the folder is
    for name in ("playground.js", "playground.css"):
        assert f"/playground/{name}".encode() in index.body
    assert set(assets()) == {"/", "/playground/playground.js", "/playground/playground.css"}
    assert page(api, "/playground/__init__.py").status_code == 404
    assert page(api, "/playground/" + "/".join(("..", "openai", "http.py"))).status_code == 404
    # the API behind the page still wants the token
    assert page(api, "/v1/models").status_code == 401


SPEC = TilingSpec()
GRID = plan_grid((400, 900), SPEC)  # 1 row of 3 tiles (1008x336 canvas), padded
SIDE = GRID.side  # 24 tokens; the 9 leftmost columns of tile 1 and rightmost of tile 3 pad
SELECTION = PackedTokens(
    features=torch.zeros(5, 4), crop=torch.tensor([0, 0, 1, 3, 3], dtype=torch.int16),
    row=torch.tensor([0, SIDE - 1, 12, 12, 13], dtype=torch.int16),
    col=torch.tensor([0, SIDE - 1, 9, SIDE - 10, SIDE - 10], dtype=torch.int16),
    newline_after=torch.zeros(5, dtype=torch.bool), image_size=(400, 900),
    grid=(GRID.rows, GRID.cols), side=SIDE, full_tokens=2000)


def test_the_layout_endpoint_gives_each_kept_token_its_box_and_each_tile_its_budget():
    door = Door(tokens="secret")
    api, auth = OpenAIApi(door), {"authorization": "Bearer secret"}
    raw = json.dumps({"image_url": f"hero-image://{IMAGE_ID}", "question": "Which car?",
                      "hero": {"method": "fastervlm", "retention": 0.25}}).encode()
    assert call(api, "POST", "/v1/hero/layout", [raw],
                {"content-length": str(len(raw))})[0] == 401
    status, _, layout, _ = call(api, "POST", "/v1/hero/layout", [raw],
                                {**auth, "content-length": str(len(raw))})
    assert status == 200, layout
    (request,) = door.pipeline.requests
    assert (request.image.image_id, request.question) == (IMAGE_ID, "Which car?")
    assert (request.prune.method, layout["method"], layout["retention"]) == \
        ("fastervlm", "fastervlm", 0.25)
    assert layout["hero"]["visual_tokens_kept"] == SELECTION.num_tokens
    assert (layout["grid"], layout["image"]) == ({"rows": 1, "cols": 3},
                                                 {"width": 900, "height": 400})
    assert [t["kept"] for t in layout["tiles"]] == [1, 0, 2]
    assert layout["thumbnail"]["kept"] == 2 and layout["thumbnail"]["of"] == SIDE * SIDE
    # the thumbnail's corners are the image's; tiles split the image from left to right
    first, last = layout["thumbnail"]["tokens"]
    assert first[:2] == [0, 0] and last[2:] == [1, 1]
    boxes = [t["box"] for t in layout["tiles"]]
    assert boxes[0][0] == 0 and boxes[-1][2] == 1 and boxes[0][2] == boxes[1][0]
    # each tile token lies inside its tile: the left edge of tile 1, the right of tile 3
    left, right, below = layout["tile_tokens"]
    assert left[0] == 0 and right[2] == pytest.approx(1) and below[1] == right[3]
    assert boxes[0][0] <= left[0] < left[2] <= boxes[0][2]
    assert boxes[2][0] <= right[0] < right[2] <= boxes[2][2]
    raw = json.dumps({"image_url": URI, "hero": {"retention": 2}}).encode()
    status, _, error, _ = call(api, "POST", "/v1/hero/layout", [raw],
                               {**auth, "content-length": str(len(raw))})
    assert (status, error["error"]["param"]) == (400, "hero.retention")


def test_tile_boxes_cover_the_image_once_without_its_padding():
    for size in [(400, 900), (900, 400), (600, 600), (300, 1200)]:
        grid = plan_grid(size, SPEC)
        boxes = tile_boxes(grid)
        assert len(boxes) == grid.rows * grid.cols
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes)
        assert area == pytest.approx(1.0), size
        assert all(0 <= v <= 1 for box in boxes for v in box)


class EndlessPipeline(CannedPipeline):
    """Answers with deltas until closed; records whether its generator was closed."""

    def __init__(self):
        super().__init__()
        self.closed = False

    async def generate(self, request, *, deadline, request_id):
        try:
            yield vision_pb2.GenerateEvent(accepted=ACCEPTED)
            while True:
                await asyncio.sleep(0)
                yield delta("x")
        finally:
            self.closed = True


@pytest.mark.parametrize("path", ["sending", "waiting"])
def test_a_streamed_answer_cancelled_anywhere_closes_the_pipeline_at_once(path):
    """Serve cancels the response when its client disconnects. Whether the cancel lands
    while the response awaits `send` or the next event, the pipeline's generator (and
    with it the language call) is closed then, not when it is garbage collected."""
    import gc

    door = Door()
    door.pipeline = EndlessPipeline()
    api = OpenAIApi(door)
    raw = body(user(image(), "q"), model="tiny", stream=True)

    async def main():
        sent, blocked = [], asyncio.Event()

        async def receive():
            if not sent:
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()  # no disconnect message: only the cancel

        async def send(message):
            sent.append(message)
            if path == "sending" and len(sent) > 3:
                blocked.set()
                await asyncio.Event().wait()  # a slow client

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "query_string": b"", "asgi": {"version": "3.0", "spec_version": "2.4"},
                 "headers": [(b"content-length", str(len(raw)).encode())]}
        response = await api(Request(scope, receive))
        task = asyncio.create_task(response(scope, receive, send))
        if path == "sending":
            await blocked.wait()
        else:
            while len(sent) < 4:
                await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
        # `response` is still held, so only a close, not the collector, ends the
        # generator (and asyncio.run would close every generator left as it ends)
        return door.pipeline.closed, response

    gc.disable()
    try:
        closed, _ = asyncio.run(main())
    finally:
        gc.enable()
    assert closed
