"""The service's tokens are hero_core's: for an image and a question, what the vision
service's request path (`VisionPipeline.prune`: cache, encoder replica, selection)
gives equals what `hero prune --tokens` writes for the same settings, bit for bit; for a
cache miss, and for a later question served from the cached entry."""

from __future__ import annotations

import asyncio
import gc
import io

import pytest
import torch
from hero.common.v1 import tensor_pb2

from hero_core.serialization import packed_from_bytes
from services.cli import main as hero
from services.sdk.vision import assemble_pruned, generate_request, prune_request
from services.vision.ingress import VisionIngress
from tests.service.vision_harness import InProcessEncoder, vision_config

QUESTIONS = ("What is the astronaut holding?", "What colour is the sky?")


@pytest.fixture(scope="module")
def image(photo, tmp_path_factory):
    """The photo as PNG bytes, and the file `hero prune` reads them from."""
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    path = tmp_path_factory.mktemp("pipeline") / "astronaut.png"
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue(), path


def hero_prune(path, question: str, method: str, ratio: float, tiny_dir, tmp_path):
    out = tmp_path / f"{method}-{len(question)}.tokens"
    assert hero(["prune", str(path), "-q", question, "-m", method, "-r", str(ratio),
                 "--tokens", str(out), "--models-dir", str(tiny_dir.parent), "--json"]) == 0
    return packed_from_bytes(out.read_bytes())


def served(encoder_object, data: bytes, asks: list[tuple[str, str, float]]):
    """(cache hit, packed tokens) of each Prune, in order, through one service."""
    async def main():
        ingress = VisionIngress(InProcessEncoder(encoder_object), vision_config("memory://"))
        answers = []
        try:
            for question, method, ratio in asks:
                request = prune_request(data, question, method=method, retention=ratio,
                                        dtype="float32")
                responses = [r async for r in ingress.pipeline.prune(
                    request, deadline=None, request_id="equal")]
                accepted, packed = assemble_pruned(responses)
                answers.append((accepted.cache_hit, packed))
        finally:
            await ingress.language.close()
        return answers
    return asyncio.run(main())


def assert_bit_equal(a, b) -> None:
    assert (a.image_size, a.grid, a.side, a.full_tokens) == \
        (b.image_size, b.grid, b.side, b.full_tokens)
    for name in ("features", "crop", "row", "col", "newline_after"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize(("method", "ratio"), [("hero", 0.111), ("random", 0.2)])
def test_the_service_serves_what_hero_prune_makes_bit_for_bit(encoder_object, image, method,
                                                             ratio, tiny_dir, tmp_path):
    data, path = image
    asks = [(question, method, ratio) for question in QUESTIONS]
    answers = served(encoder_object, data, asks)
    assert [hit for hit, _ in answers] == [False, True]  # the second question is a hit
    for (question, _, _), (_, packed) in zip(asks, answers, strict=True):
        assert_bit_equal(packed, hero_prune(path, question, method, ratio, tiny_dir, tmp_path))
    if method == "hero":  # the question moves HERO's tile budgets: not a vacuous check
        assert not torch.equal(answers[0][1].crop, answers[1][1].crop)


class EndlessLanguage:
    """A language client that takes every prompt and answers "x" forever; records whether
    its answer's generator was closed (which is what cancels a real language call)."""

    def __init__(self):
        self.closed = False

    async def validate(self, **_):
        return None

    async def generate(self, packed, **_):
        try:
            while True:
                await asyncio.sleep(0)
                yield tensor_pb2.TextDelta(text="x")
        finally:
            self.closed = True

    async def close(self):
        return None


def test_closing_an_answer_at_a_yield_closes_its_language_call(encoder_object, image):
    """A front door that stops reading (an HTTP client went away) closes the pipeline's
    generator where it is suspended, at a yield: the language call is closed then, not
    when the collector finds it."""
    async def main():
        ingress = VisionIngress(InProcessEncoder(encoder_object), vision_config("memory://"))
        language = ingress.pipeline.language = EndlessLanguage()
        events = ingress.pipeline.generate(generate_request(image[0], "What is it?"),
                                           deadline=None, request_id="closed")
        kinds = [(await anext(events)).WhichOneof("event") for _ in range(4)]
        await events.aclose()
        return kinds, language.closed

    gc.disable()
    try:
        kinds, closed = asyncio.run(main())
    finally:
        gc.enable()
    assert kinds == ["accepted", "delta", "delta", "delta"] and closed


class BurstLanguage(EndlessLanguage):
    """Answers with 20 one-token deltas made at once, then the usage."""

    async def generate(self, packed, **_):
        for i in range(20):
            yield tensor_pb2.TextDelta(text=f"w{i} ", token_ids=[i])
        await asyncio.sleep(0.05)
        yield tensor_pb2.Usage(completion_tokens=20)


@pytest.mark.parametrize("coalesce", [False, True])
def test_the_relay_merges_a_burst_of_deltas_only_when_coalescing(encoder_object, image,
                                                                 coalesce):
    """`stream_coalesce`: what the language service sent at once is relayed in one or two
    events (the first delta may go alone), saying the same text and tokens; off, one
    event per delta."""
    async def main():
        ingress = VisionIngress(InProcessEncoder(encoder_object), vision_config(
            "memory://", stream_coalesce=coalesce, stream_interval_ms=500.0))
        ingress.pipeline.language = BurstLanguage()
        return [e async for e in ingress.pipeline.generate(
            generate_request(image[0], "What is it?"), deadline=None, request_id="burst")]

    events = asyncio.run(main())
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert "".join(d.text for d in deltas) == "".join(f"w{i} " for i in range(20))
    assert [t for d in deltas for t in d.token_ids] == list(range(20))
    assert events[-1].usage.language.completion_tokens == 20
    assert len(deltas) <= 2 if coalesce else len(deltas) == 20


class RecordingLanguage(EndlessLanguage):
    """Records the packed tokens and turns of each Generate; answers "x" once."""

    def __init__(self):
        super().__init__()
        self.sent = []

    async def generate(self, packed, messages=(), **_):
        self.sent.append((packed, tuple(messages)))
        yield tensor_pb2.TextDelta(text="x")


def generated(encoder_object, data: bytes, conversations, method: str):
    """The packed tokens the language service got for each Generate, in order."""
    async def main():
        ingress = VisionIngress(InProcessEncoder(encoder_object), vision_config("memory://"))
        language = ingress.pipeline.language = RecordingLanguage()
        for turns in conversations:
            request = generate_request(data, None, messages=turns, method=method)
            _ = [e async for e in ingress.pipeline.generate(request, deadline=None,
                                                             request_id="turns")]
        return [packed for packed, _ in language.sent]
    return asyncio.run(main())


@pytest.mark.parametrize("method", ["hero", "fastervlm"])
def test_a_later_turn_gets_the_tokens_selected_for_the_first_question(encoder_object, image,
                                                                     method):
    """A conversation's tokens are chosen for its first question, so a follow-up turn
    sends exactly the first turn's tokens (the same visual prefix for the language
    engine's KV cache), whatever it asks now."""
    first, later = QUESTIONS
    conversations = [[("user", first)],
                     [("user", first), ("assistant", "A flag."), ("user", later)],
                     [("user", later)]]
    turn1, turn2, alone = generated(encoder_object, image[0], conversations, method)
    assert_bit_equal(turn2, turn1)
    if method == "hero":  # the later question alone selects other tokens: not vacuous
        assert not torch.equal(alone.crop, turn1.crop) or \
            not torch.equal(alone.features, turn1.features)
    else:  # a method that does not read the question keeps the same tokens for any
        assert_bit_equal(alone, turn1)
