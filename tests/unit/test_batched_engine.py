"""The batching engine: batched equals alone, alone equals stock generate, KV admission.

"Alone" is the same engine with one request; "stock" is transformers' `generate`.
In a batch, rows are left-padded and share matrix products with other rows, so their
fp32 logits differ from the alone run by rounding only: at most `TOLERANCE` here.
Greedy tokens must then be identical at every step whose top-two logit margin
exceeds the tolerance; the random-weight tiny model has near-ties, which are counted
and reported, and an answer may only part from its alone run at one of them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import pytest
import torch

from hero_core.errors import InvalidInputError
from hero_core.generation import format_chat, generate_greedy
from hero_core.methods import create_method
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import Delta, SamplingParams
from services.language.engine import Finished
from services.language.model import EngineRequest
from tests.conftest import noise_image

TOLERANCE = 1e-4
"""Largest |batched - alone| fp32 logit difference allowed (measured: 1.4e-5 at most)."""


class RecordingEngine(BatchingEngine):
    """The real engine, also keeping the logits each request's tokens were drawn from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        self.batch_sizes: list[int] = []

    def _sample(self, seqs, logits):
        for seq, row in zip(seqs, logits, strict=True):
            self.logits[seq.request.request_id].append(row.detach().clone())
        if len(seqs) > 1 or seqs[0].status.value == "decode":
            self.batch_sizes.append(len(seqs))
        return super()._sample(seqs, logits)


@dataclasses.dataclass
class Answer:
    tokens: list[int]
    text: str
    finished: Finished


async def collect(engine, request, deadline=None, stop_after=None, progress=None) -> Answer:
    """Run one request; optionally close its stream after `stop_after` tokens (a cancel)
    and set `progress` once it has produced 4 tokens."""
    tokens, text, finished = [], "", None
    stream = engine.stream(request, deadline)
    async for event in stream:
        if isinstance(event, Delta):
            tokens += event.token_ids
            text += event.text
            if progress is not None and len(tokens) >= 4:
                progress.set()
            if stop_after is not None and len(tokens) >= stop_after:
                await stream.aclose()
                break
        else:
            finished = event
    return Answer(tokens, text, finished)


def request(request_id, packed, question, max_new_tokens, **params):
    return EngineRequest(request_id, packed, (("user", question),),
                         SamplingParams(max_new_tokens, ignore_eos=True, **params))


@pytest.fixture(scope="module")
def mixed(pruner, photo):
    """Requests with different grids (square, wide, tall), retentions, methods, prompts
    and lengths; the last two join once the first is decoding."""
    wide, tall = noise_image(300, 1000, 1), noise_image(900, 260, 2)
    small = noise_image(400, 400, 3)
    hero, full, faster = (create_method(n) for n in ("hero", "full", "fastervlm"))
    return [
        request("square-0.111", pruner.prune(photo, "What is held?", hero, 0.111).packed,
                "What is the astronaut holding?", 60),
        request("wide-1.0", pruner.prune(wide, "", full, 1.0).packed, "Describe it.", 40),
        request("tall-0.222", pruner.prune(tall, "", faster, 0.222).packed,
                "List every colour you can see, then count the stripes.", 70),
        request("square-0.056", pruner.prune(photo, "Where?", hero, 0.056).packed, "Where?", 12),
        request("late-0.111", pruner.prune(small, "Shape?", hero, 0.111).packed, "Shape?", 30),
        request("late-sampled", pruner.prune(photo, "Colour?", hero, 0.111).packed,
                "What colour is the suit?", 24, temperature=0.8, top_p=0.9, seed=3),
    ]


def run_together(engine, requests, joiners=2):
    async def scenario():
        started = asyncio.Event()
        first = [asyncio.create_task(collect(engine, r, progress=started if i == 0 else None))
                 for i, r in enumerate(requests[:-joiners])]
        await started.wait()  # the first request is decoding: the rest join mid-batch
        late = [asyncio.create_task(collect(engine, r)) for r in requests[-joiners:]]
        return await asyncio.gather(*first, *late)
    return asyncio.run(scenario())


def run_alone(language_model, requests):
    engine = RecordingEngine(language_model, BatchingConfig())
    try:
        return engine, [asyncio.run(collect(engine, r)) for r in requests]
    finally:
        engine.shutdown()


def compare(batched_logits, alone_logits, batched_tokens, alone_tokens):
    """Max logit difference over the steps both runs share, and near-tie count; fails
    if a token differs at a step that is not a near-tie."""
    worst, near_ties = 0.0, 0
    for step, (b, a) in enumerate(zip(batched_logits, alone_logits, strict=False)):
        worst = max(worst, float((b - a).abs().max()))
        top2 = torch.topk(a, 2).values
        tie = float(top2[0] - top2[1]) <= TOLERANCE
        near_ties += tie
        if batched_tokens[step] != alone_tokens[step]:
            assert tie, f"step {step}: tokens differ with a margin above {TOLERANCE}"
            break  # the answers have parted at a near-tie; later steps are not comparable
    return worst, near_ties


def test_batched_equals_alone_for_requests_that_join_and_leave_mid_batch(
        language_model, mixed, capsys):
    engine = RecordingEngine(language_model, BatchingConfig(max_prefill_tokens_per_step=256))
    try:
        together = run_together(engine, mixed)
    finally:
        engine.shutdown()
    alone_engine, alone = run_alone(language_model, mixed)
    assert max(engine.batch_sizes) >= 4, "the requests did not run as one batch"
    report = []
    for req, got, ref in zip(mixed, together, alone, strict=True):
        assert got.finished.completion_tokens == req.params.max_new_tokens
        worst, ties = compare(engine.logits[req.request_id], alone_engine.logits[req.request_id],
                              got.tokens, ref.tokens)
        assert worst <= TOLERANCE, f"{req.request_id}: logits differ by {worst:.2e}"
        if ties == 0:
            assert got.tokens == ref.tokens and got.text == ref.text
        report.append(f"{req.request_id}: max |dlogit| {worst:.1e}, near-ties {ties}")
    with capsys.disabled():
        print(f"\nbatched vs alone (tolerance {TOLERANCE:.0e}): {'; '.join(report)}")


@pytest.mark.parametrize(("retention", "fragmented"), [(1.0, False), (0.111, False),
                                                      (0.111, True)])
def test_alone_equals_stock_generate_token_for_token(language_model, vlm, pruner, photo,
                                                    retention, fragmented):
    """Fragmented: the sequence's KV blocks are not consecutive (read by gather, not in
    place), as after other sequences came and went."""
    method = create_method("full" if retention == 1.0 else "hero")
    packed = pruner.prune(photo, "What is held?", method, retention).packed
    question = "What is the astronaut holding?"
    engine = BatchingEngine(language_model, BatchingConfig())
    if fragmented:
        gone, kept = engine.blocks.take([], 1), engine.blocks.take([], 1)
        engine.blocks.release(gone)  # free: block 0, then 2 onwards
        assert kept == [1]
    try:
        got = asyncio.run(collect(engine, EngineRequest("r", packed, (("user", question),),
                                                        SamplingParams(20))))
    finally:
        engine.shutdown()
    prompt = format_chat(vlm.tokenizer, [("user", question)])
    stock = generate_greedy(vlm.model, vlm.tokenizer, packed, prompt, vlm.image_token_id, 20)
    eos = vlm.model.generation_config.eos_token_id
    assert got.tokens == (stock[: stock.index(eos)] if eos in stock else stock)


def test_cancel_and_deadline_of_one_sequence_leave_the_others_unchanged(language_model, mixed):
    import time

    keep, cancel, expire = mixed[0], mixed[2], mixed[4]
    long_keep = dataclasses.replace(keep, params=dataclasses.replace(keep.params,
                                                                     max_new_tokens=300))
    endless = dataclasses.replace(expire, params=dataclasses.replace(expire.params,
                                                                     max_new_tokens=4000))
    engine = RecordingEngine(language_model, BatchingConfig())

    async def scenario():
        deadline = time.monotonic() + 1.0
        return await asyncio.gather(collect(engine, long_keep),
                                    collect(engine, cancel, stop_after=3),
                                    collect(engine, endless, deadline=deadline))
    try:
        kept, cancelled, expired = asyncio.run(scenario())
        stats = engine.stats()
    finally:
        engine.shutdown()
    _, (alone,) = run_alone(language_model, [long_keep])
    assert len(cancelled.tokens) == 3 and cancelled.finished is None
    assert expired.finished.finish_reason == "cancelled"
    assert expired.finished.completion_tokens < 4000
    assert stats.running == 0 and stats.kv_tokens_reserved == 0
    assert len(kept.tokens) == 300
    assert kept.tokens == alone.tokens


def test_a_request_larger_than_the_kv_cache_is_refused_naming_the_limit(language_model, mixed):
    engine = BatchingEngine(language_model, BatchingConfig(kv_cache_tokens=256))
    with pytest.raises(InvalidInputError, match=r"kv_cache_tokens=256; lower max_new_tokens"):
        engine.check(mixed[0], 2048)


async def run_all(engine, requests):
    return await asyncio.gather(*[collect(engine, r) for r in requests])


def peak_batches(language_model, pruner, photo, budget, **settings):
    """Eight questions about one photo at each retention, on one KV budget: the most
    that decoded together, and how many reservations of prompt + answer fit."""
    peaks, fits = {}, {}
    for retention, method in ((1.0, "full"), (0.111, "hero")):
        packed = pruner.prune(photo, "What?", create_method(method), retention).packed
        requests = [request(f"{retention}-{i}", packed, f"Question {i}?", 32) for i in range(8)]
        fits[retention] = budget // (language_model.prompt_tokens(requests[0]) + 32)
        engine = RecordingEngine(language_model,
                                 BatchingConfig(kv_cache_tokens=budget, **settings))
        try:
            answers = asyncio.run(run_all(engine, requests))
        finally:
            engine.shutdown()
        assert all(a.finished.completion_tokens == 32 for a in answers)
        peaks[retention] = max(engine.batch_sizes)
        if retention == 1.0 and peaks[retention] < 8:
            assert max(a.finished.queue_ms for a in answers) > 0
    return peaks, fits


def test_at_lower_retention_more_sequences_share_the_same_kv_cache(language_model, pruner,
                                                                  photo):
    """One KV budget, eight requests, each reserving prompt + visual + max_new_tokens
    and reusing nothing: at R=1.0 one runs at a time, at R=0.111 as many as fit."""
    budget = 3200  # one full-resolution request of this photo (2,940 tokens + answer)
    peaks, fits = peak_batches(language_model, pruner, photo, budget, kv_allocation="reserve",
                               prefix_cache=False)
    assert peaks[1.0] == fits[1.0] == 1
    assert peaks[0.111] == fits[0.111] == 7


def test_questions_about_the_same_kept_tokens_share_their_kv(language_model, pruner, photo):
    """The same budget with prefix reuse and growing allocation: the eight questions share
    the image's blocks, so even at full resolution most of them decode together."""
    peaks, _ = peak_batches(language_model, pruner, photo, 3200)
    assert peaks[1.0] >= 6
    assert peaks[0.111] == 8


class FailingPrefill(BatchingEngine):
    """The real engine whose model step fails for the request named "bad"."""

    def _prefill(self, chunk):
        if chunk.sequence.request.request_id == "bad":
            raise RuntimeError("model step failed")
        super()._prefill(chunk)


def test_a_failing_model_step_fails_its_request_alone(language_model, mixed):
    good = mixed[0]
    bad = dataclasses.replace(mixed[3], request_id="bad")
    engine = FailingPrefill(language_model, BatchingConfig())

    async def scenario():
        return await asyncio.gather(collect(engine, good), collect(engine, bad),
                                    return_exceptions=True)
    try:
        answer, failure = asyncio.run(scenario())
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert isinstance(failure, RuntimeError) and "model step failed" in str(failure)
    assert answer.finished.completion_tokens == good.params.max_new_tokens
    assert stats.running == 0 and stats.kv_tokens_reserved == 0
    _, (alone,) = run_alone(language_model, [good])
    assert answer.tokens == alone.tokens


def test_shutdown_ends_running_sequences_as_cancelled(language_model, mixed):
    endless = dataclasses.replace(mixed[0], params=dataclasses.replace(mixed[0].params,
                                                                       max_new_tokens=4000))
    engine = BatchingEngine(language_model, BatchingConfig())

    async def scenario():
        started = asyncio.Event()
        task = asyncio.create_task(collect(engine, endless, progress=started))
        await started.wait()
        await asyncio.to_thread(engine.shutdown)
        return await task
    answer = asyncio.run(scenario())
    assert answer.finished.finish_reason == "cancelled"
    assert 4 <= answer.finished.completion_tokens < 4000
