"""The OpenAI-compatible API of the running system, through Serve's HTTP proxy, with the
real `openai` client (and raw HTTP where a client would hide what is checked): answers
streamed and not, images by data URI and by id, pruning settings in `extra_body`, the
same tokens as gRPC, every error status, disconnects and oversized bodies, and
lmms-eval's OpenAI-compatible model. Runs after test_system_faults.py."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from services.common.params import TIMEOUT_HEADER
from services.local import wait_for
from tests.conftest import noise_image
from tests.integration.conftest import API_TOKEN, png
from tests.integration.test_system import Q1
from tests.integration.test_system_door import sequences_freed
from tests.integration.test_system_overload import LONG, ended, in_flight

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def oa(system):
    with openai.OpenAI(base_url=system.http_url, api_key=API_TOKEN, max_retries=0,
                       timeout=120) as client:
        yield client


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def post(system, payload: dict | bytes, headers: dict[str, str] | None = None,
         token: str | None = API_TOKEN) -> http.client.HTTPResponse:
    """A raw POST to the chat endpoint (the response is left to read)."""
    connection = http.client.HTTPConnection("127.0.0.1", system.http_port, timeout=120)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("POST", CHAT, body, {"Content-Type": "application/json", **auth,
                                            **(headers or {})})
    response = connection.getresponse()
    response.connection = connection  # to hang up: `hang_up(response)`
    return response


def hang_up(response: http.client.HTTPResponse) -> None:
    """Close the response's TCP connection now (closing the response alone leaves the
    socket open until the connection object is collected)."""
    response.connection.sock.shutdown(socket.SHUT_RDWR)
    response.connection.close()
    response.close()


def test_models_lists_the_served_model_with_its_hero_defaults(oa):
    (model,) = oa.models.list().data
    assert model.id == "tiny" and oa.models.retrieve("tiny").id == "tiny"
    assert model.hero["default_method"] == "hero" and model.hero["default_retention"] == 0.111
    assert {"hero", "full", "fastervlm"} <= set(model.hero["methods"])


def test_an_image_by_data_uri_then_by_its_id_is_a_cache_hit(oa):
    data = png(noise_image(500, 380, seed=2401))  # new to this system: a miss
    raw = oa.chat.completions.with_raw_response.create(
        model="tiny", messages=messages(data_uri(data), Q1), max_tokens=6, temperature=0)
    first = raw.parse()
    hero = first.usage.hero
    assert raw.headers["x-hero-image-id"] == hero["image_id"] and len(hero["image_id"]) == 64
    assert raw.headers["x-hero-cache-hit"] == "false" and not hero["cache_hit"]
    assert (hero["visual_tokens_kept"], first.usage.completion_tokens) == (320, 6)
    assert first.usage.total_tokens == first.usage.prompt_tokens + 6
    assert first.choices[0].finish_reason == "length" and first.choices[0].message.content
    again = oa.chat.completions.create(model="tiny", messages=messages(hero["image_url"], Q1),
                                       max_tokens=6, temperature=0)
    assert again.usage.hero["cache_hit"] and again.usage.hero["image_id"] == hero["image_id"]
    assert again.choices[0].message.content == first.choices[0].message.content


def test_a_stream_is_chunks_with_usage_then_done(system, oa, photo):
    url = data_uri(png(photo))
    chunks = list(oa.chat.completions.create(
        model="tiny", messages=messages(url, Q1), max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].hero["visual_tokens_kept"] == 320
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    # on the wire: server-sent events, the last one [DONE]
    response = post(system, {"messages": messages(url, Q1), "max_tokens": 3, "stream": True})
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.read().decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][6:])  # include_usage was not asked for


def test_extra_body_sets_the_pruning_method_and_retention(oa, photo):
    url = data_uri(png(photo))
    kept = {}
    for method, retention in (("hero", 0.111), ("hero", 0.25), ("full", 1.0)):
        answer = oa.chat.completions.create(
            model="tiny", messages=messages(url, Q1), max_tokens=2, temperature=0,
            extra_body={"hero": {"method": method, "retention": retention}})
        kept[(method, retention)] = answer.usage.hero["visual_tokens_kept"]
    assert kept[("hero", 0.111)] == 320 < kept[("hero", 0.25)]
    assert kept[("full", 1.0)] == 2880  # every token of the thumbnail and 2x2 tiles


def test_greedy_answers_through_http_and_grpc_are_the_same_tokens(oa, client, photo):
    data = png(photo)
    for question in (Q1, "Describe the colours."):
        grpc_events = list(client.generate(data, question, max_new_tokens=16, timeout=120))
        grpc_texts = [e.delta.text for e in grpc_events
                      if e.WhichOneof("event") == "delta" and e.delta.text]
        stream = oa.chat.completions.create(
            model="tiny", messages=messages(data_uri(data), question), max_tokens=16,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        http_texts = [c.choices[0].delta.content for c in chunks[1:-2]]
        # the same text; where each stream cuts it into deltas depends on timing, as
        # both services coalesce the deltas that queue behind a busy writer
        assert "".join(http_texts) == "".join(grpc_texts) and all(http_texts)
        assert chunks[-1].usage.completion_tokens == \
            grpc_events[-1].usage.language.completion_tokens


BAD_REQUESTS = [
    ({"messages": messages("https://example.com/cat.png", Q1)}, 400, "image_url_hosts"),
    ({"messages": [{"role": "user", "content": Q1}]}, 400, "one image per conversation"),
    ({"messages": messages("data:image/png;base64,AAAA", Q1) * 2}, 400, "has 2"),
    ({"messages": messages("data:image/png;base64,@@", Q1)}, 400, "not valid base64"),
    ({"messages": messages("data:image/png;base64,AAAA", Q1), "n": 3}, 400, "n must be 1"),
    ({"messages": messages("data:image/png;base64,AAAA", Q1)}, 400, "image"),
    ({"messages": messages("hero-image://" + "0" * 64, Q1)}, 404, "send the image"),
    ({"messages": messages("data:image/png;base64,AAAA", Q1), "model": "gpt-4o"}, 404,
     "not served here"),
    ({"messages": messages("data:image/png;base64,AAAA", Q1),
      "hero": {"method": "nonesuch"}}, 400, "nonesuch"),
]


@pytest.mark.parametrize("payload, status, words", BAD_REQUESTS)
def test_a_bad_request_gets_its_status_and_an_openai_error_object(system, payload, status,
                                                                  words):
    response = post(system, payload)
    error = json.loads(response.read())["error"]
    assert response.status == status, error
    assert words in error["message"] and error["type"] and error["code"], error


def test_the_api_requires_the_grpc_apis_bearer_token(system, oa):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=system.http_url, api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"
    response = post(system, {"messages": messages("data:image/png;base64,AAAA", Q1)},
                    token=None)
    assert response.status == 401 and json.loads(response.read())["error"]["code"] == \
        "unauthenticated"
    response = post(system, {"messages": messages("data:image/png;base64,AAAA", Q1)},
                    token="some-other-token")  # the other accepted token
    assert response.status == 400  # past the door: refused for its image


def test_a_body_over_the_limit_is_refused_from_its_content_length(system):
    connection = http.client.HTTPConnection("127.0.0.1", system.http_port, timeout=10)
    connection.putrequest("POST", CHAT)
    for key, value in (("Authorization", f"Bearer {API_TOKEN}"),
                       ("Content-Length", str(1 << 30))):
        connection.putheader(key, value)
    connection.endheaders()  # and no body at all: the answer needs none of it
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert (response.status, error["code"]) == (413, "request_too_large")


def test_past_the_language_queue_the_answer_is_429_with_retry_after(system, oa, photo):
    """The language service batches 2 and queues 4 (conftest): of 14 long answers at
    once, those past its queue are refused with 429 before any text was sent."""
    url = data_uri(png(photo))
    oa.chat.completions.create(model="tiny", messages=messages(url, Q1),
                               max_tokens=2)  # cached: calls reach the queue

    def one(i: int) -> tuple[int, str | None]:
        response = post(system, {"messages": messages(url, LONG), "max_tokens": 256,
                                 "ignore_eos": True, "stream": i % 2 == 0})
        response.read()
        return response.status, response.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        outcomes = list(pool.map(one, range(14)))
    assert {s for s, _ in outcomes} <= {200, 429}, outcomes
    assert any(s == 429 for s, _ in outcomes) and sum(s == 200 for s, _ in outcomes) >= 6
    assert all(retry == "1" for s, retry in outcomes if s == 429), outcomes
    wait_for(lambda: in_flight(system) == 0, 10, "language service to drain")


def test_a_deadline_is_504_and_frees_the_language_service(system, photo):
    url = data_uri(png(photo))
    post(system, {"messages": messages(url, Q1), "max_tokens": 2}).read()  # cached
    before = ended(system)
    start = time.monotonic()
    response = post(system, {"messages": messages(url, LONG), "max_tokens": 4096,
                             "ignore_eos": True}, {TIMEOUT_HEADER: "1500"})
    error = json.loads(response.read())["error"]
    assert (response.status, error["type"]) == (504, "timeout_error"), error
    assert time.monotonic() - start < 4
    wait_for(lambda: sequences_freed(system, before), 10, "the sequence to be freed")


def test_a_client_that_disconnects_mid_stream_frees_its_language_sequence(system, photo):
    url = data_uri(png(photo))
    post(system, {"messages": messages(url, Q1), "max_tokens": 2}).read()  # cached
    freed_after = []
    for _ in range(12):
        before = ended(system)
        response = post(system, {"messages": messages(url, LONG), "max_tokens": 4096,
                                 "ignore_eos": True, "stream": True})
        assert response.status == 200
        for _ in range(3):
            assert response.readline().startswith(b"data: ")
            response.readline()
        hang_up(response)
        closed_at = time.monotonic()
        while not sequences_freed(system, before) and time.monotonic() - closed_at < 10:
            time.sleep(0.02)
        freed_after.append(round(time.monotonic() - closed_at, 2))
    assert all(s <= 1.0 for s in freed_after), freed_after


def test_lmms_evals_openai_model_answers_through_the_endpoint(system):
    script = Path(__file__).with_name("lmms_openai_client.py")
    done = subprocess.run([sys.executable, str(script), system.http_url, API_TOKEN, "tiny"],
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for result in results:
        assert result["text"] and "LMMS_EVAL_REQUEST_FAILED" not in result["text"], result
        # prompt tokens count the image's visual tokens
        assert result["output_tokens"] >= 1 and result["input_tokens"] > 100
    wrong = subprocess.run([sys.executable, str(script), system.http_url, API_TOKEN,
                            "grok-2-latest"], capture_output=True, text=True, timeout=300,
                           check=True)
    failed = json.loads(wrong.stdout.strip().splitlines()[-1])
    assert all("LMMS_EVAL_REQUEST_FAILED" in r["text"] and "404" in r["text"]
               for r in failed), failed
