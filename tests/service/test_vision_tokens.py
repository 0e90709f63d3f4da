"""The vision service's token path (cache or encode) over a real Redis, without Ray:
which request encodes, what is stored, and which stored values are trusted."""

from __future__ import annotations

import asyncio

import pytest
import redis
import torch
from hero.vision.v1 import vision_pb2

from hero_core.cache import entry_from_bytes, entry_to_bytes, image_digest, image_key
from hero_core.errors import InvalidInputError
from services.common.errors import UnavailableError
from services.vision.cache import CountingMetrics, seal, unseal
from services.vision.ingress import VisionIngress
from services.vision.tokens import ImageNotFoundError
from tests.service.vision_harness import (
    BatchingEncoder,
    InProcessEncoder,
    key_of,
    png_bytes,
    vision_config,
)


def by_bytes(data: bytes) -> vision_pb2.ImageInput:
    return vision_pb2.ImageInput(data=data)


def by_id(data: bytes) -> vision_pb2.ImageInput:
    return vision_pb2.ImageInput(image_id=image_digest(data))


OPTIONS = vision_pb2.PruneOptions()


def run(scenario, encoder_object, redis_url: str, **config):
    """Run `scenario(ingress, encoder)` with an ingress made inside the event loop."""
    async def main():
        encoder = InProcessEncoder(encoder_object)
        ingress = VisionIngress(encoder, vision_config(redis_url, **config))
        try:
            await scenario(ingress, encoder)
        finally:
            await ingress.cache.store.close()
            await ingress.language.close()
    asyncio.run(main())


def same_tokens(a, b) -> bool:
    return torch.equal(a.packed.features, b.packed.features) and torch.equal(
        a.packed.crop, b.packed.crop) and torch.equal(a.packed.row, b.packed.row)


def test_a_bytes_request_never_inherits_the_failure_of_an_image_id_request(
        encoder_object, redis_server):
    async def scenario(ingress, encoder):
        for seed in range(4):  # images never sent before: the id alone cannot be served
            data = png_bytes(seed)
            first = asyncio.create_task(ingress.source.tokens(by_id(data), OPTIONS, "what?"))
            second = asyncio.create_task(ingress.source.tokens(by_bytes(data), OPTIONS,
                                                               "what?"))
            tokens = await second
            assert tokens.image_id == image_digest(data) and not tokens.cache_hit
            outcome = (await asyncio.gather(first, return_exceptions=True))[0]
            assert isinstance(outcome, ImageNotFoundError) or same_tokens(outcome, tokens)
        assert len(encoder.jobs) == 4
    run(scenario, encoder_object, redis_server.url)


def test_an_entry_moved_under_another_images_key_is_not_served(encoder_object,
                                                                redis_server):
    """The envelope names the key it was stored under: a's stored value copied as it is
    under b's key (a misrouted write, a copied key) is dropped, and b encoded."""
    raw = redis.Redis(port=redis_server.port)

    async def scenario(ingress, encoder):
        a, b = png_bytes(1), png_bytes(2)
        await ingress.source.tokens(by_bytes(a), OPTIONS, "what?")
        truth = await ingress.source.tokens(by_bytes(b), OPTIONS, "what?")
        key_a, key_b = await key_of(ingress.source, a), await key_of(ingress.source, b)
        raw.set(key_b, raw.get(key_a))
        served = await ingress.source.tokens(by_bytes(b), OPTIONS, "what?")
        assert not served.cache_hit and same_tokens(served, truth)
        assert (await ingress.source.tokens(by_bytes(b), OPTIONS, "what?")).cache_hit
    run(scenario, encoder_object, redis_server.url)


def test_with_a_secret_only_entries_with_its_mac_are_served(encoder_object, redis_server,
                                                            monkeypatch):
    raw = redis.Redis(port=redis_server.port)
    monkeypatch.setenv("HERO_VISION_CACHE__SECRET", "test-secret-not-for-production")

    async def scenario(ingress, encoder):
        data = png_bytes(3)
        truth = await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
        assert (await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")).cache_hit
        key = await key_of(ingress.source, data)
        value, problem = unseal(key, raw.get(key), b"test-secret-not-for-production")
        assert problem == ""
        for forged in (seal(key, value), seal(key, value, b"another-secret")):
            raw.set(key, forged)
            served = await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
            assert not served.cache_hit and same_tokens(served, truth)
        assert len(encoder.jobs) == 3
    run(scenario, encoder_object, redis_server.url)


def test_with_a_secret_another_images_entry_resealed_under_a_key_is_rebuilt(
        encoder_object, redis_server, monkeypatch):
    """A Redis writer without the secret puts a's entry under b's key in an envelope for
    that key (without a MAC, or with a MAC of its own key): every check but the MAC
    passes (both images have the same grid), so the MAC is what refuses it."""
    raw = redis.Redis(port=redis_server.port)
    secret = b"test-secret-not-for-production"
    monkeypatch.setenv("HERO_VISION_CACHE__SECRET", secret.decode())

    async def scenario(ingress, encoder):
        ingress.cache.metrics = counts = CountingMetrics()
        a, b = png_bytes(8), png_bytes(9)
        await ingress.source.tokens(by_bytes(a), OPTIONS, "what?")
        truth = await ingress.source.tokens(by_bytes(b), OPTIONS, "what?")
        key_a, key_b = await key_of(ingress.source, a), await key_of(ingress.source, b)
        value, _ = unseal(key_a, raw.get(key_a), secret)
        for sealed in (seal(key_b, value), seal(key_b, value, b"the-writer's-own-key")):
            raw.set(key_b, sealed)
            served = await ingress.source.tokens(by_id(b), OPTIONS, "what?")
            assert not served.cache_hit and same_tokens(served, truth)
        assert counts.counts["unverified"] == 2 and len(encoder.jobs) == 4
        assert (await ingress.source.tokens(by_bytes(b), OPTIONS, "what?")).cache_hit
    run(scenario, encoder_object, redis_server.url)


def test_a_stored_image_that_does_not_hash_to_its_id_is_never_encoded(encoder_object,
                                                                       redis_server):
    raw = redis.Redis(port=redis_server.port)

    async def scenario(ingress, encoder):
        a, b = png_bytes(4), png_bytes(5)
        await ingress.source.tokens(by_bytes(a), OPTIONS, "what?")
        key = image_key(image_digest(a))
        raw.set(key, seal(key, b))  # another picture under a's id
        raw.delete(await key_of(ingress.source, a))  # a's tokens expired: must encode
        with pytest.raises(ImageNotFoundError, match="send the image bytes"):
            await ingress.source.tokens(by_id(a), OPTIONS, "what?")
        assert len(encoder.jobs) == 1 and raw.get(key) is None
    run(scenario, encoder_object, redis_server.url)


def test_an_inconsistent_entry_is_dropped_and_re_encoded(encoder_object, redis_server):
    raw = redis.Redis(port=redis_server.port)

    async def scenario(ingress, encoder):
        data = png_bytes(6)
        truth = await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
        key, method_fp = await key_of(ingress.source, data), \
            ingress.config.method("hero").compute_hash()
        value, _ = unseal(key, raw.get(key))
        for crop, index in ((1, 9999), (0, -3)):  # the record itself is well formed
            entry = entry_from_bytes(value, method_fp)
            entry.order[crop][0] = index
            raw.set(key, seal(key, entry_to_bytes(entry, method_fp)))
            served = await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
            assert not served.cache_hit and same_tokens(served, truth)
        assert (await ingress.source.tokens(by_id(data), OPTIONS, "what?")).cache_hit
    run(scenario, encoder_object, redis_server.url)


def test_with_redis_down_an_image_id_is_unavailable_and_bytes_are_served(encoder_object,
                                                                         redis_server):
    async def scenario(ingress, encoder):
        data = png_bytes(7)
        ingress.cache.metrics = counts = CountingMetrics()
        await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
        redis_server.stop()
        with pytest.raises(UnavailableError, match="retry, or send the image bytes"):
            await ingress.source.tokens(by_id(data), OPTIONS, "what?")
        tokens = await ingress.source.tokens(by_bytes(data), OPTIONS, "what?")
        assert not tokens.cache_hit and counts.counts["error_get"] >= 2
    run(scenario, encoder_object, redis_server.url)


def test_bytes_that_are_not_an_image_are_refused_and_not_stored(encoder_object,
                                                                 redis_server):
    """The encoder decodes the bytes it is sent; bytes that are not an image fail there,
    before any tower pass, and are never stored for later image_id requests."""
    raw = redis.Redis(port=redis_server.port)

    async def scenario(ingress, encoder):
        junk = b"\x89PNG\r\n\x1a\n" + b"not really a picture" * 50
        encoded = encoder_object.images_encoded
        with pytest.raises(InvalidInputError, match="could not be decoded"):
            await ingress.source.tokens(by_bytes(junk), OPTIONS, "what?")
        assert raw.get(image_key(image_digest(junk))) is None
        assert encoder_object.images_encoded == encoded
    run(scenario, encoder_object, redis_server.url)


def run_batched(scenario, encoder_object, redis_url: str, **batching):
    """Run `scenario(source, encoder)`: the token path over an encoder that batches."""
    async def main():
        encoder = BatchingEncoder(encoder_object, **batching)
        ingress = VisionIngress(encoder, vision_config(redis_url))
        try:
            await scenario(ingress.source, encoder)
        finally:
            await ingress.cache.store.close()
            await ingress.language.close()
    asyncio.run(main())


def test_a_miss_encodes_and_stores_and_the_next_request_is_a_hit(encoder_object,
                                                                   redis_server):
    async def scenario(source, encoder):
        data = png_bytes(21)
        first = await source.tokens(by_bytes(data), OPTIONS, "what?")
        second = await source.tokens(by_id(data), OPTIONS, "what?")
        other = await source.tokens(by_bytes(data), OPTIONS, "and the colour?")
        assert (first.cache_hit, second.cache_hit, other.cache_hit) == (False, True, True)
        assert sum(len(b) for b in encoder.batches) == 1  # the hits did not encode
        assert same_tokens(first, second)  # a hit serves what the miss made
    run_batched(scenario, encoder_object, redis_server.url)


def test_concurrent_misses_for_one_image_encode_it_once(encoder_object, redis_server):
    async def scenario(source, encoder):
        data = png_bytes(22)
        served = await asyncio.gather(*(source.tokens(by_bytes(data), OPTIONS, f"q{i}?")
                                        for i in range(4)))
        assert [len(b) for b in encoder.batches] == [1]
        assert all(same_tokens(t, served[0]) for t in served)
    run_batched(scenario, encoder_object, redis_server.url)


def test_one_bad_image_in_a_batch_fails_alone(encoder_object, redis_server):
    """Two images encoded in one tower pass; the encoder fails one of them. Its request
    gets the error, the other its tokens, the same as when encoded alone."""
    good, bad = png_bytes(23), png_bytes(24)

    async def alone(source, encoder):
        truth.append(await source.tokens(by_bytes(good), OPTIONS, "what?"))

    truth: list = []
    run_batched(alone, encoder_object, redis_server.url)
    redis.Redis(port=redis_server.port).flushall()

    async def scenario(source, encoder):
        served, failed = await asyncio.gather(
            source.tokens(by_bytes(good), OPTIONS, "what?"),
            source.tokens(by_bytes(bad), OPTIONS, "what?"), return_exceptions=True)
        assert [len(b) for b in encoder.batches] == [2]  # one tower pass for both
        assert isinstance(failed, Exception) and "layer 40" in str(failed)
        assert not served.cache_hit and same_tokens(served, truth[0])
        assert not await source.cache.get(await key_of(source, bad))  # nothing stored
    run_batched(scenario, encoder_object, redis_server.url,
                sabotage=frozenset({image_digest(bad)}))
