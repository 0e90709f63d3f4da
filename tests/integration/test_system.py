"""End to end: VisionService (Ray Serve gRPC proxy) -> Redis -> language service."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import pytest
import ray
import redis
import torch
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

from hero_core.generation import format_prompt
from hero_core.methods import create_method
from hero_core.tiling import plan_grid
from services.common.drain import Drain
from services.vision.drain import NAMESPACE, SIGNAL_NAME, follow
from tests.conftest import noise_image
from tests.integration.conftest import png

Q1 = "What is the astronaut holding?"
Q2 = "What colour is the flag in the corner?"


def run(client, image, prompt, **options):
    events = list(client.generate(image, prompt, timeout=120, **options))
    accepted = events[0].accepted
    tokens = [t for e in events if e.WhichOneof("event") == "delta" for t in e.delta.token_ids]
    text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert events[0].WhichOneof("event") == "accepted"
    assert events[-1].WhichOneof("event") == "usage"
    return accepted, tokens, text, events[-1].usage


def encoder_stats():
    from ray import serve

    return serve.get_deployment_handle("Encoder", app_name="hero").stats.remote().result()


def flush(system):
    redis.Redis.from_url(system.redis.url).flushdb()


def test_generate_streams_accepted_deltas_and_usage(client, photo, pruner):
    accepted, tokens, _, usage = run(client, png(photo), Q1, max_new_tokens=12)
    assert accepted.tokens_kept == 320 and accepted.tokens_total == 2928
    assert len(accepted.image_id) == 64
    assert 1 <= len(tokens) <= 12 and usage.language.completion_tokens == len(tokens)
    expected = pruner.prune(photo, Q1, create_method("hero"), 0.111).packed
    assert usage.language.visual_tokens == expected.num_embeddings
    assert usage.vision_ms > 0 and usage.ttft_ms >= usage.language.prefill_ms
    assert usage.bytes_sent == 320 * 64 * 4


def test_cached_equals_uncached_for_a_second_different_question(system, client, photo, pruner):
    data = png(photo)
    run(client, data, Q1, max_new_tokens=4)  # makes sure the entry exists
    hit, hit_tokens, hit_text, _ = run(client, data, Q2, max_new_tokens=16)
    hit_accepted, hit_packed = client.prune(data, Q2, dtype="float32")
    assert hit.cache_hit and hit_accepted.cache_hit

    flush(system)
    miss, miss_tokens, miss_text, _ = run(client, data, Q2, max_new_tokens=16)
    assert not miss.cache_hit
    assert (hit_tokens, hit_text) == (miss_tokens, miss_text)
    flush(system)
    miss_accepted, miss_packed = client.prune(data, Q2, dtype="float32")
    assert not miss_accepted.cache_hit
    assert torch.equal(hit_packed.features, miss_packed.features)
    assert torch.equal(hit_packed.crop, miss_packed.crop)

    # ... and both equal hero_core in process (uncached by construction).
    expected = pruner.prune(photo, Q2, create_method("hero"), 0.111).packed
    assert torch.equal(hit_packed.features, expected.features)
    assert torch.equal(hit_packed.row, expected.row) and torch.equal(hit_packed.col, expected.col)


def test_the_question_changes_tile_budgets_served_from_one_entry(client, photo, pruner):
    data = png(photo)
    _, a = client.prune(data, "the flag in the top left corner", dtype="float32")
    b_accepted, b = client.prune(data, "the helmet at the bottom right", dtype="float32")
    assert b_accepted.cache_hit
    assert a.counts_per_crop()[0] == b.counts_per_crop()[0]
    assert sum(a.counts_per_crop()) == sum(b.counts_per_crop()) == 320


def test_full_method_matches_stock_transformers_generate(client, vlm, tiny_dir):
    image = noise_image(601, 299, seed=3)  # 2x1 grid, odd sizes
    accepted, tokens, _, _ = run(client, png(image), Q1, method="full", retention=1.0,
                                 max_new_tokens=12)
    grid = plan_grid((601, 299), vlm.tiling)
    assert accepted.tokens_kept == int(grid.valid_mask().sum())
    assert accepted.tokens_total == grid.full_token_count
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(tiny_dir / "llava"),
        tokenizer=vlm.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    inputs = processor(images=image, text=format_prompt(vlm.tokenizer, Q1), return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                 pad_token_id=vlm.tokenizer.pad_token_id)
    stock = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = vlm.model.generation_config.eos_token_id
    stock = stock[: stock.index(eos)] if eos in stock else stock
    assert tokens == stock


def test_concurrent_requests_for_a_new_image_encode_it_once(client):
    data = png(noise_image(480, 640, seed=42))
    before = encoder_stats()["images_encoded"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda q: run(client, data, q, max_new_tokens=2),
                                [f"question {i}?" for i in range(6)]))
    assert encoder_stats()["images_encoded"] - before == 1
    assert sum(1 for accepted, *_ in results if not accepted.cache_hit) >= 1
    assert len({accepted.image_id for accepted, *_ in results}) == 1


def test_an_image_id_can_replace_the_upload(client):
    data = png(noise_image(300, 500, seed=7))
    first, *_ = run(client, data, Q1, max_new_tokens=2)
    again, *_ = run(client, None, Q2, image_id=first.image_id, max_new_tokens=2)
    assert again.cache_hit and again.image_id == first.image_id
    other, *_ = run(client, None, Q2, image_id=first.image_id, method="fastervlm",
                    max_new_tokens=2)  # re-encoded from the stored image bytes
    assert not other.cache_hit


def test_redis_outage_is_a_miss_and_the_cache_returns_with_redis(system, client, photo):
    from grpc_health.v1 import health_pb2

    data = png(photo)
    run(client, data, Q1, max_new_tokens=2)
    port = system.redis.port
    system.redis.stop()
    try:
        down, tokens, _, _ = run(client, data, Q2, max_new_tokens=4)
        assert not down.cache_hit and tokens
        status, cache = health(system.target)
        assert status == health_pb2.HealthCheckResponse.SERVING  # misses still serve
        assert (cache["hero-cache"], cache["hero-cache-reason"]) == ("degraded", "connection")
    finally:
        system.redis.port = port
        system.redis.start()
    first, *_ = run(client, data, Q2, max_new_tokens=2)
    second, *_ = run(client, data, Q1, max_new_tokens=2)
    assert not first.cache_hit and second.cache_hit
    assert health(system.target)[1] == {"hero-cache": "ok"}


@pytest.mark.parametrize(("options", "code", "message"), [
    ({"image": b"not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    ({"method": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown pruning method"),
    ({"retention": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, r"\(0, 1\]"),
    ({"prompt": "  "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"image": None, "image_id": "0" * 64}, grpc.StatusCode.NOT_FOUND, "send the image bytes"),
    ({"image": None, "image_id": "xyz"}, grpc.StatusCode.INVALID_ARGUMENT, "64-hex-digit"),
])
def test_bad_requests_get_a_code_and_a_message(client, photo, options, code, message):
    import re

    settings = {"image": png(photo), "prompt": Q1, "max_new_tokens": 2, **options}
    image, prompt = settings.pop("image"), settings.pop("prompt")
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(image, prompt, timeout=60, **settings))
    assert info.value.code() == code, info.value.details()
    assert re.search(message, info.value.details()), info.value.details()


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_the_public_api_requires_a_valid_bearer_token(system, photo, token):
    from services.sdk.vision import VisionClient

    with VisionClient(system.target, token=token) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            list(anonymous.generate(png(photo), Q1, max_new_tokens=2, timeout=60))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in info.value.details() and "wrong-token" not in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            anonymous.prune(png(photo), Q1, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def health(target: str, service: str = "") -> tuple[int, dict[str, str]]:
    """The health status and the token cache's state from the trailing metadata."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        answer, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
            health_pb2.HealthCheckRequest(service=service), timeout=30)
    cache = {k: v for k, v in call.trailing_metadata() or () if k.startswith("hero-cache")}
    return answer.status, cache


def health_status(target: str, service: str = "") -> int:
    return health(target, service)[0]


def test_the_public_port_answers_grpc_health_checks(system):
    from grpc_health.v1 import health_pb2

    serving = health_pb2.HealthCheckResponse.SERVING
    assert health(system.target) == (serving, {"hero-cache": "ok"})
    assert health_status(system.target, "hero.vision.v1.VisionService") == serving
    with pytest.raises(grpc.RpcError) as info:
        health_status(system.target, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_request_bytes_that_do_not_parse_are_invalid_argument(system):
    from tests.integration.conftest import API_TOKEN

    with grpc.insecure_channel(system.target) as channel:
        raw = channel.unary_stream("/hero.vision.v1.VisionService/Generate")  # bytes as is
        for payload in (b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 64, b"\x12\x05ab"):
            with pytest.raises(grpc.RpcError) as info:
                list(raw(payload, timeout=60,
                         metadata=[("authorization", f"Bearer {API_TOKEN}")]))
            details = info.value.details()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "GenerateRequest" in details
            assert "<class" not in details and " at 0x" not in details


def test_an_upload_above_the_limit_is_refused_by_the_proxy_before_any_replica(system):
    """No token and far too many bytes: the proxy's message bound refuses it as it
    arrives (RESOURCE_EXHAUSTED), instead of reading it whole for a replica to refuse."""
    import time

    from services.sdk.vision import VisionClient
    from services.vision.config import VisionConfig

    limit = VisionConfig.model_validate(system.args).max_request_bytes
    with VisionClient(system.target) as anonymous:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(anonymous.generate(b"\0" * (limit + (1 << 20)), Q1, timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert time.monotonic() - start < 10


def test_the_vision_metrics_are_exported_under_their_documented_names(system):
    """Ray exports the vision service's metrics with `ray_` in front and `_total` after
    counters: the names the Grafana dashboard and docs use."""
    import time
    import urllib.request

    wanted = ("ray_hero_vision_cache_events_total", "ray_hero_vision_requests_total",
              "ray_hero_vision_cache_up",
              "ray_hero_vision_stage_seconds_bucket", "ray_hero_vision_tokens_kept_bucket",
              "ray_hero_vision_sent_bytes_bucket")
    text, until = "", time.monotonic() + 60
    while time.monotonic() < until:
        url = f"http://127.0.0.1:{system.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert all(name in text for name in wanted), [n for n in wanted if n not in text]
    assert "ray_hero_vision_stage_ms" not in text


def test_an_ingress_built_outside_a_replica_does_not_follow_the_runners_drain(system):
    """This process runs the system's Ray and its drain signal; an ingress object built here
    (as the service tests build theirs) is no replica of it, so it leaves no task behind
    following that signal."""
    assert ray.is_initialized() and ray.get_actor(SIGNAL_NAME, namespace=NAMESPACE)

    async def main():
        return follow(Drain())

    assert asyncio.run(main()) is None
