"""Cache values poisoned by someone who can write to Redis (no cache secret set, as a
private setup may run): each is wrong in its structure yet passes the envelope and CRC
checks, recomputed as any writer who knows the format can. Every request must
still get the tokens an uncached request gets, and the value must be rebuilt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch
from hero.vision.v1 import vision_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hero_core.cache import image_digest, image_key
from hero_core.serialization import decode_record, encode_record
from services.local import RedisProcess
from services.vision.cache import CountingMetrics, seal, unseal
from services.vision.encoder import Encoded, Encoder, EncodeRequest
from services.vision.ingress import VisionIngress
from services.vision.tokens import ImageNotFoundError
from tests.service.vision_harness import (
    Context,
    InProcessEncoder,
    key_of,
    png_bytes,
    vision_config,
)
from tests.unit.test_serialization import forged, header_of

IMAGE = png_bytes(40)
QUESTIONS = ("What is in the picture?", "")
Mutation = Callable[[bytes], bytes]


class MemoEncoder:
    """The real encoder, run once per image and method: a rebuild gets the value the
    encoder made for it (as a second tower pass would), without paying for the pass."""

    def __init__(self, encoder: Encoder):
        self.inner = InProcessEncoder(encoder)
        self.made: dict[tuple[str, str, float], Encoded] = {}
        self.jobs: list[EncodeRequest] = []

    async def spec(self) -> Any:
        return await self.inner.spec()

    async def encode(self, request: EncodeRequest) -> Encoded:
        self.jobs.append(request)
        made = (image_digest(request.image), request.method, request.retention)
        if made not in self.made:
            self.made[made] = await self.inner.encode(request)
        return self.made[made]

    async def embed_question(self, question: str) -> Any:
        return await self.inner.embed_question(question)


class Harness:
    """One ingress over a private Redis, driven from synchronous (Hypothesis) tests."""

    def __init__(self, encoder_object: Encoder, server: RedisProcess, **config: Any):
        self.loop = asyncio.new_event_loop()
        self.encoder = MemoEncoder(encoder_object)
        self.ingress: VisionIngress = self.run(self._ingress(server.url, config))
        self.ingress.cache.metrics = self.counts = CountingMetrics()
        self.raw = redis.Redis(port=server.port)

    async def _ingress(self, url: str, config: dict[str, Any]) -> VisionIngress:
        return VisionIngress(self.encoder, vision_config(url, **config))

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def tokens(self, by_id: bool, question: str, method: str = "") -> Any:
        image = vision_pb2.ImageInput(image_id=image_digest(IMAGE)) if by_id \
            else vision_pb2.ImageInput(data=IMAGE)
        options = vision_pb2.PruneOptions(method=method)
        return self.run(self.ingress.source.tokens(image, options, question))

    def key(self, method: str = "hero") -> str:
        return self.run(key_of(self.ingress.source, IMAGE, method))

    def value(self, key: str) -> bytes:
        value, problem = unseal(key, self.raw.get(key))
        assert value is not None, problem
        return value

    def close(self) -> None:
        self.run(self.ingress.cache.store.close())
        self.run(self.ingress.language.close())
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    process = RedisProcess(maxmemory="64mb").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def harness(encoder_object, server) -> Iterator[Harness]:
    h = Harness(encoder_object, server)
    yield h
    h.close()


@pytest.fixture(scope="module")
def truth(harness) -> dict[tuple[str, str], Any]:
    """Tokens of uncached requests (a miss each), per method and question."""
    found = {}
    for method in ("hero", "random"):
        for question in QUESTIONS:
            harness.raw.delete(harness.key(method))
            tokens = harness.tokens(False, question, method)
            assert not tokens.cache_hit
            found[method, question] = tokens.packed
    return found


def same_tokens(a, b) -> bool:
    return a.image_size == b.image_size and a.grid == b.grid and all(
        torch.equal(getattr(a, name), getattr(b, name))
        for name in ("features", "crop", "row", "col", "newline_after"))


# ---- forging records ------------------------------------------------------------------


def in_header(change: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(value: bytes) -> bytes:
        header, data = header_of(value)
        change(header)
        return forged(header, data)
    return mutate


def in_record(change: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(value: bytes) -> bytes:
        header, _ = header_of(value)
        kind = header["__metadata__"]["hero.kind"]
        meta, tensors = decode_record(value, kind)
        change(meta, tensors)
        return encode_record(kind, meta, tensors)
    return mutate


def nested(depth: int) -> Any:
    tree: Any = {}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


def set_meta(name: str, value: Any) -> Mutation:
    return in_record(lambda meta, t: meta.__setitem__(name, value))


def set_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    return in_record(lambda meta, t: t.__setitem__(name, change(t[name]).contiguous()))


def with_nan(position: float, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.clone().flatten()
        flat[int(position * (flat.numel() - 1))] = value
        return flat.view(tensor.shape)
    return change


def shift_length(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    t["lengths"] = t["lengths"].clone()
    t["lengths"][0] -= 1
    t["lengths"][1] += 1


def extra_ranked_tokens(count: int) -> Mutation:
    """`count` more tokens in crop 0's ranking, consistently in every array (repeats of
    its first token, or ranks past the method's cap)."""
    def change(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        n0 = int(t["lengths"][0])
        t["lengths"] = t["lengths"].clone()
        t["lengths"][0] += count
        t["order"] = torch.cat([t["order"][:n0], t["order"][:1].repeat(count), t["order"][n0:]])
        t["features"] = torch.cat([t["features"][:n0], t["features"][:1].repeat(count, 1),
                                   t["features"][n0:]])
    return in_record(change)


def keep_nothing(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    """A consistent record that keeps no token (a method's selection never does)."""
    t["lengths"] = torch.zeros_like(t["lengths"])
    t["order"], t["features"] = t["order"][:0], t["features"][:0]


SIZES = st.sampled_from([[0, 0], [0, 500], [340, 0], [-340, 500], [340, -1], [100000, 100000],
                         [2 ** 40, 2], "340x500", [340.0, 500.0], [True, 500], [340],
                         [340, 500, 3], None, {"h": 340}, ["340", 500]])
BAD_DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32])
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
FRACTIONS = st.floats(0, 1)

HEADER_MUTATIONS = st.one_of(
    # nesting past the limit: a tensor-like entry, or the metadata JSON itself
    st.integers(8, 400).map(lambda d: in_header(lambda h: h.__setitem__("x", nested(d)))),
    st.integers(8, 400).map(lambda d: set_meta("note", nested(d))),
    # a header above its size limit
    st.integers(64 << 10, 256 << 10).map(
        lambda n: in_header(lambda h: h["__metadata__"].__setitem__("pad", "x" * n))),
    # wrong types where the safetensors header has strings and mappings
    st.sampled_from([{"not": "a string"}, 7, None, ["a"]]).map(
        lambda v: in_header(lambda h: h["__metadata__"].__setitem__("hero.meta", v))),
    st.sampled_from([[1, 2], "F32", 3]).map(
        lambda v: in_header(lambda h: h.__setitem__("features", v))),
    st.sampled_from(["F16", "I64", "BOOL", 5]).map(
        lambda v: in_header(lambda h: h["features"].__setitem__("dtype", v))),
    st.sampled_from([["1", 2], [-1, 3], "2x3", [2 ** 62, 2 ** 62]]).map(
        lambda v: in_header(lambda h: h["features"].__setitem__("shape", v))),
)

SHARED_MUTATIONS = st.one_of(
    SIZES.map(lambda v: set_meta("image_size", v)),
    st.just(set_tensor("features", lambda f: f[:, : f.shape[1] // 2])),
    st.integers(1, 40).map(lambda n: set_tensor(
        "features", lambda f: torch.cat([f, f[:n]]))),
    BAD_DTYPES.map(lambda d: set_tensor("features", lambda f: f.to(d))),
    st.builds(lambda p, v: set_tensor("features", with_nan(p, v)), FRACTIONS, NON_FINITE),
)

RECORD_MUTATIONS = st.one_of(
    HEADER_MUTATIONS, SHARED_MUTATIONS,
    st.sampled_from([torch.int32, torch.int64, torch.float32]).map(
        lambda d: set_tensor("order", lambda o: o.to(d))),
    st.just(set_tensor("lengths", lambda n: n.to(torch.int64))),
    st.integers(1, 30).map(extra_ranked_tokens),
    st.just(in_record(lambda meta, t: t.__setitem__("state.extra", torch.zeros(3)))),
)

ENTRY_MUTATIONS = st.one_of(
    RECORD_MUTATIONS,
    st.just(in_record(shift_length)),
    st.just(set_tensor("state.embeds", lambda e: e[:, : e.shape[1] // 2])),
    st.just(set_tensor("state.embeds", lambda e: torch.cat([e, e[:1]]))),
    st.just(set_tensor("state.embeds", lambda e: e.double())),
    st.builds(lambda p, v: set_tensor("state.embeds", with_nan(p, v)), FRACTIONS, NON_FINITE),
    st.just(in_record(lambda meta, t: t.pop("state.embeds"))),
)

SELECTION_MUTATIONS = st.one_of(
    RECORD_MUTATIONS,
    st.just(set_tensor("order", lambda o: o + 576)),
    st.just(in_record(keep_nothing)),
)


def served_after_poisoning(harness: Harness, truth: dict, method: str, mutate: Mutation,
                           by_id: bool, question: str) -> None:
    """Write `mutate(the stored value)` under its key, then check that the request gets
    the truth from a rebuilt value, and that the next one is a hit on it."""
    key = harness.key(method)
    original = harness.value(key)
    harness.raw.set(key, seal(key, mutate(original)))
    corrupt, jobs = harness.counts.counts.get("corrupt", 0), len(harness.encoder.jobs)
    served = harness.tokens(by_id, question, method)
    assert not served.cache_hit and same_tokens(served.packed, truth[method, question])
    assert harness.counts.counts["corrupt"] == corrupt + 1
    assert len(harness.encoder.jobs) == jobs + 1  # rebuilt from the image
    again = harness.tokens(by_id, question, method)
    assert again.cache_hit and same_tokens(again.packed, truth[method, question])


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(ENTRY_MUTATIONS, st.booleans(), st.sampled_from(QUESTIONS))
def test_a_poisoned_entry_is_rebuilt_and_every_request_gets_the_uncached_tokens(
        harness, truth, mutate, by_id, question):
    served_after_poisoning(harness, truth, "hero", mutate, by_id, question)


@settings(FUZZ, max_examples=30)
@given(SELECTION_MUTATIONS, st.booleans())
def test_a_poisoned_selection_is_rebuilt_and_every_request_gets_the_uncached_tokens(
        harness, truth, mutate, by_id):
    served_after_poisoning(harness, truth, "random", mutate, by_id, "")


def header_nested(depth: int) -> Mutation:
    """A header whose one extra entry nests `depth` levels deep, written as text (the
    CRC cannot be recomputed by parsing it; it is refused before any parsing)."""
    def mutate(value: bytes) -> bytes:
        length = int.from_bytes(value[:8], "little")
        text = value[8:9] + b'"x":' + b"[" * depth + b"]" * depth + b"," \
            + value[9:8 + length]
        return len(text).to_bytes(8, "little") + text + value[8 + length:]
    return mutate


def zero_size(value: bytes) -> bytes:
    return set_meta("image_size", [0, 0])(value)


def half_width_embeds(value: bytes) -> bytes:
    return set_tensor("state.embeds", lambda e: e[:, : e.shape[1] // 2])(value)


@pytest.mark.parametrize("mutate", [header_nested(100_000), zero_size, half_width_embeds],
                         ids=["header-nested-100000", "image-size-0x0", "half-width-embeds"])
@pytest.mark.parametrize("by_id", [False, True], ids=["bytes", "image-id"])
def test_the_reported_poisoned_entries_are_rebuilt(harness, truth, mutate, by_id):
    served_after_poisoning(harness, truth, "hero", mutate, by_id, QUESTIONS[0])


@pytest.mark.parametrize("mutate", [header_nested(100_000), zero_size, half_width_embeds],
                         ids=["header-nested-100000", "image-size-0x0", "half-width-embeds"])
def test_an_image_id_alone_with_a_poisoned_entry_and_no_stored_image_is_not_found(
        harness, truth, mutate):
    key = harness.key()
    original = harness.value(key)
    stored_image = harness.raw.get(image_key(image_digest(IMAGE)))
    harness.raw.delete(image_key(image_digest(IMAGE)))
    harness.raw.set(key, seal(key, mutate(original)))
    try:
        with pytest.raises(ImageNotFoundError, match="send the image bytes"):
            harness.tokens(True, QUESTIONS[0])
        assert harness.raw.get(key) is None  # dropped: the next request rebuilds it
        request = vision_pb2.PruneRequest(image=vision_pb2.ImageInput(
            image_id=image_digest(IMAGE)), question=QUESTIONS[0])
        harness.raw.set(key, seal(key, mutate(original)))
        context = Context()

        async def prune() -> None:
            async for _ in harness.ingress.Prune(request, context):
                pass
        with pytest.raises(Exception, match="NOT_FOUND"):
            harness.run(prune())
        assert context.code_set.name == "NOT_FOUND" and "send the image" in context.details_set
    finally:
        harness.raw.set(image_key(image_digest(IMAGE)), stored_image)
        harness.raw.set(key, seal(key, original))


def test_an_entry_that_decodes_but_fails_for_the_question_is_dropped_and_rebuilt(
        harness, truth, monkeypatch):
    """Defence in depth: with the state check switched off, half-width crop embeddings
    pass decoding (budgets without a question work) and fail only once the question's
    embedding meets them. That failure, too, drops the entry and rebuilds it."""
    import hero_core.cache

    monkeypatch.setattr(hero_core.cache, "_check_state", lambda state, expected: None)
    served_after_poisoning(harness, truth, "hero", half_width_embeds, False, QUESTIONS[0])
