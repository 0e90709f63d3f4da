"""The batching engine with a paged KV cache: prefix reuse never changes an answer,
preempted sequences recompute to the same answer, and requests that could never run
are refused when they are submitted.

Answers are compared as in test_batched_engine.py: logits within the batched-vs-alone
tolerance, and the same greedy tokens wherever the top-two margin exceeds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from hero_core.errors import InvalidInputError
from hero_core.methods import create_method
from loadtest.micro.kv_cache import Observer
from loadtest.micro.prefix_share import common_prefix
from services.common.errors import UnavailableError
from services.language.config import BatchingConfig
from tests.unit.test_batched_engine import (
    TOLERANCE,
    RecordingEngine,
    collect,
    compare,
    request,
    run_all,
)
from tests.unit.test_kv_blocks import spoiled


def engine_with_log(language_model, **settings):
    engine = RecordingEngine(language_model, BatchingConfig(**settings))
    engine.observer = Observer()  # its lookups: what each admission found cached
    return engine


def answers(language_model, requests, together=False, **settings):
    """Run `requests` one after the other (or all at once) on one engine: the answers,
    the engine's recorded logits and its observer."""
    engine = engine_with_log(language_model, **settings)
    try:
        if together:
            got = asyncio.run(run_all(engine, requests))
        else:
            got = [asyncio.run(collect(engine, r)) for r in requests]
    finally:
        engine.shutdown()
    return got, engine


def assert_same_answer(request_id, got, engine, ref, ref_engine):
    worst, ties = compare(engine.logits[request_id], ref_engine.logits[request_id],
                          got.tokens, ref.tokens)
    assert worst <= TOLERANCE, f"{request_id}: logits differ by {worst:.2e}"
    assert len(got.tokens) == len(ref.tokens)
    if ties == 0:
        assert got.tokens == ref.tokens and got.text == ref.text


def test_a_follow_up_question_reuses_the_image_and_gets_the_same_answer(language_model,
                                                                      packed):
    first = request("first", packed, "What is the astronaut holding?", 6)
    follow = request("follow", packed, "Describe the colours of the suit.", 40)
    (_, got), engine = answers(language_model, [first, follow])
    (ref,), ref_engine = answers(language_model, [follow], prefix_cache=False)
    (_, first_hits), (tokens, hits) = engine.observer.lookups
    image_end = 7 + packed.num_embeddings  # "USER: " and the image come first
    assert first_hits == 0 and hits >= image_end // 16 * 16 and hits < tokens
    assert ref_engine.observer.lookups == [(tokens, 0)]
    assert_same_answer("follow", got, engine, ref, ref_engine)


def test_a_later_turn_of_a_conversation_reuses_the_first_turns_prompt(language_model,
                                                                     packed):
    """The vision service sends a conversation's later turns the first turn's kept tokens
    (`services.vision.pipeline.first_question`): such a turn's prompt extends the first
    turn's, and every full block of what they have in common is found in the cache."""
    first = request("turn-1", packed, "What is the astronaut holding?", 6)
    later = dataclasses.replace(first, request_id="turn-2", messages=(
        *first.messages, ("assistant", "A flag."), ("user", "What colour is it?")))
    (_, got), engine = answers(language_model, [first, later])
    (ref,), ref_engine = answers(language_model, [later], prefix_cache=False)
    ids = [language_model.prompt_ids(r).tolist() for r in (first, later)]
    first_ids, later_ids = ids
    common = common_prefix(first_ids, later_ids)
    in_common = common - 1 + packed.num_embeddings  # the image placeholder spreads out
    (_, first_hits), (tokens, hits) = engine.observer.lookups
    assert first_hits == 0 and in_common > 7 + packed.num_embeddings
    assert in_common // 16 * 16 <= hits < tokens
    assert_same_answer("turn-2", got, engine, ref, ref_engine)


def test_the_same_request_again_reuses_its_prompt_and_its_answer(language_model, packed):
    ask = request("again", packed, "What is the astronaut holding?", 40)
    (ref, got), engine = answers(language_model, [ask, ask])
    (tokens, first), (_, second) = engine.observer.lookups
    assert first == 0 and second == (tokens - 1) // 16 * 16
    assert got.tokens == ref.tokens


def test_kept_tokens_differing_in_one_index_share_only_the_blocks_before_it(language_model,
                                                                          packed):
    token = 100
    position = 7 + token + int(packed.newline_after[:token].sum())
    base = request("base", packed, "What is the astronaut holding?", 4)
    other = request("other", spoiled(packed, token), "What is the astronaut holding?", 30)
    (_, got), engine = answers(language_model, [base, other])
    (ref,), ref_engine = answers(language_model, [other], prefix_cache=False)
    assert engine.observer.lookups[1][1] == position // 16 * 16
    assert_same_answer("other", got, engine, ref, ref_engine)


@pytest.fixture(scope="module")
def crowd(pruner, photo):
    """Three requests about different images (no prefix in common), long answers."""
    from tests.conftest import noise_image

    images = [photo, noise_image(400, 400, 3), noise_image(300, 600, 5)]
    return [request(f"crowd-{i}", pruner.prune(image, "What?", create_method("hero"),
                                               0.111).packed, f"Question {i}?", 120)
            for i, image in enumerate(images)]


def test_a_preempted_sequence_recomputes_to_the_same_answer(language_model, crowd):
    prompts = sum(language_model.prompt_tokens(r) for r in crowd)
    budget = (prompts + 160) // 16 * 16  # every prompt fits, not every answer
    got, engine = answers(language_model, crowd, together=True, kv_cache_tokens=budget)
    assert engine.observer.preemptions >= 1
    assert engine.stats().preemptions == engine.observer.preemptions
    assert max(engine.batch_sizes) == 3
    for req, answer in zip(crowd, got, strict=True):
        assert answer.finished.completion_tokens == 120
        (ref,), ref_engine = answers(language_model, [req])
        assert_same_answer(req.request_id, answer, engine, ref, ref_engine)


def test_a_request_that_could_never_fit_is_refused_when_submitted(language_model, crowd):
    """Not only `check`: one that reaches the engine without it is refused at once (it
    used to wait forever, with the scheduler thread spinning), and the engine goes on."""
    engine = engine_with_log(language_model, kv_cache_tokens=512)
    small = dataclasses.replace(crowd[0], request_id="small", params=dataclasses.replace(
        crowd[0].params, max_new_tokens=4))
    need = language_model.prompt_tokens(small) + 4
    assert need <= 512
    too_big = dataclasses.replace(crowd[0], params=dataclasses.replace(
        crowd[0].params, max_new_tokens=512 - need + 5))
    try:
        with pytest.raises(InvalidInputError, match=r"kv_cache_tokens=512"):
            asyncio.run(asyncio.wait_for(collect(engine, too_big), 10))
        answer = asyncio.run(asyncio.wait_for(collect(engine, small), 60))
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert answer.finished.completion_tokens == 4
    assert (stats.running, stats.waiting) == (0, 0)


def test_a_request_submitted_after_shutdown_gets_an_error(language_model, crowd):
    engine = engine_with_log(language_model)
    asyncio.run(collect(engine, dataclasses.replace(crowd[0], params=dataclasses.replace(
        crowd[0].params, max_new_tokens=2))))
    engine.shutdown()
    with pytest.raises(UnavailableError, match="shutting down"):
        asyncio.run(asyncio.wait_for(collect(engine, crowd[1]), 10))
    never_started = engine_with_log(language_model)
    never_started.shutdown()
    with pytest.raises(UnavailableError):
        asyncio.run(asyncio.wait_for(collect(never_started, crowd[1]), 10))


class AdmissionOrder(RecordingEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order: list[str] = []

    def _admitted(self, seq):
        self.order.append(seq.request.request_id)
        super()._admitted(seq)


def test_small_requests_pass_a_large_one_that_does_not_fit_until_it_has_waited_enough(
        language_model, pruner, photo, packed):
    """A long answer runs; a full-resolution request arrives and cannot fit beside it;
    two small ones arrive behind it. With max_bypass=1 the first small one passes it,
    the second waits behind it."""
    full = pruner.prune(photo, "What?", create_method("full"), 1.0).packed
    blocks = lambda r: -(-(language_model.prompt_tokens(r) + r.params.max_new_tokens) // 16)  # noqa: E731
    running = request("running", packed, "Tell a long story.", 200)
    large = request("large", full, "What is it?", 8)
    small = [request(f"small-{i}", packed, f"Question {i}?", 8) for i in range(2)]
    budget = 16 * (blocks(running) + blocks(large) - 1)
    engine = AdmissionOrder(language_model, BatchingConfig(
        kv_cache_tokens=budget, kv_allocation="reserve", prefix_cache=False, max_bypass=1))

    async def scenario():
        started = asyncio.Event()
        first = asyncio.create_task(collect(engine, running, progress=started))
        await started.wait()
        rest = [asyncio.create_task(collect(engine, r)) for r in (large, *small)]
        await asyncio.sleep(0)
        return await asyncio.gather(first, *rest)
    try:
        got = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert all(a.finished.finish_reason == "length" for a in got)
    assert engine.order == ["running", "small-0", "large", "small-1"]


def test_the_service_metrics_count_reuse_and_the_blocks(language_model, packed):
    from prometheus_client import generate_latest

    from services.language.metrics import LanguageMetrics

    metrics = LanguageMetrics()
    engine = RecordingEngine(language_model, BatchingConfig())
    engine.observer = metrics
    metrics.watch(engine.stats)
    first = request("first", packed, "What is the astronaut holding?", 4)
    follow = request("follow", packed, "Describe the colours of the suit.", 4)
    try:
        for r in (first, follow):
            asyncio.run(collect(engine, r))
        text = generate_latest(metrics.registry).decode()
        stats = engine.stats()
    finally:
        engine.shutdown()
    def value(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))

    tokens = sum(language_model.prompt_tokens(r) for r in (first, follow))
    hits = value("hero_language_prefix_cache_hit_tokens_total")
    assert value("hero_language_prefix_cache_query_tokens_total") == tokens
    assert hits >= (7 + packed.num_embeddings) // 16 * 16 and hits % 16 == 0
    assert value("hero_language_prefix_cache_hit_rate") == pytest.approx(hits / tokens)
    assert value("hero_language_kv_blocks_cached") == stats.kv_blocks_cached >= hits // 16
    assert value("hero_language_kv_blocks_free") == stats.kv_blocks_free == 1024
    assert value("hero_language_preemptions_total") == 0
