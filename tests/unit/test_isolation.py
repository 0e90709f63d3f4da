"""One request never changes or ends another's answer in the batched engine: a property.

A greedy "victim" decodes beside an arbitrary "hostile" request (any sampling
parameters the engine can be given, visual features holding NaN, infinities or huge
finite values, a row that goes bad mid-answer); then two more victims run, one of them
on KV slots the hostile used (the prefix cache emptied first, so they compute every
block). Every victim must produce exactly the tokens the victim produces alone (the
first victim may also reuse blocks earlier victims left in the prefix cache); the
hostile must complete or end alone with a clear error. The victim is chosen with no
near-tie in its answer (top-two logit margin far above the rounding by which batched
logits differ from alone ones), so "exactly" is the right test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import NonFiniteLogitsError, SamplingParams
from services.language.model import EngineRequest
from tests.unit.test_batched_engine import collect, request
from tests.unit.test_sampling import FLOAT32_MAX, seeds, temperatures, top_ps

VICTIM = ("What is the astronaut holding?", 24)
MARGIN = 1e-3
"""Smallest top-two logit margin allowed in the victim's answer alone (batched logits
differ from alone ones by < 2e-5)."""
FAULTS = ("nan", "inf", "sample", "text", "forward", "finish", "cancel")
"""A row gone bad at its k-th token: NaN or +inf logits, its sampler failing, its text
failing to decode, or the decode forward failing whenever it holds that row; its text
failing to flush when it ends, or when its client goes away at its k-th token."""
TIMEOUT_S = 120
"""A scenario that runs longer has lost a stream (one that never ends)."""
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class Injected(RuntimeError):
    """A failure the test injects into one row."""


class Harness(BatchingEngine):
    """The real engine; records the KV slots each request reads and writes and injects
    `faults` into rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots: dict[str, set[int]] = {}
        self.faults: dict[str, tuple[str, int]] = {}

    def _due(self, seq, kinds) -> bool:
        kind, at = self.faults.get(seq.request.request_id, ("", 0))
        return kind in kinds and len(seq.text.ids) == at - 1

    def _record(self, seq):
        self.slots.setdefault(seq.request.request_id, set()).update(seq.slots.tolist())

    def _admitted(self, seq):
        super()._admitted(seq)
        self._record(seq)
        if self.faults.get(seq.request.request_id, ("",))[0] in ("finish", "cancel"):
            def finish(reason=None):
                raise Injected("the text of this row failed to flush")
            seq.text.finish = finish

    def _sample(self, seqs, logits):
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            self._record(seq)  # its blocks grow as it decodes
            if self._due(seq, ("nan", "inf")):
                kind = self.faults[seq.request.request_id][0]
                logits[row, row % logits.shape[1]] = math.nan if kind == "nan" else math.inf
            if self._due(seq, ("sample",)):  # a real failure of the sampler on this row
                params = dataclasses.replace(seq.request.params, temperature=math.nan)
                seq.request = dataclasses.replace(seq.request, params=params)
        return super()._sample(seqs, logits)

    def _accept(self, seq, token):
        if self._due(seq, ("text",)):
            raise Injected("the text of this row failed")
        if self._due(seq, ("cancel",)):
            seq.aborted = True  # its client goes away: it ends before the next step
        super()._accept(seq, token)

    def _run_decode(self, rows):
        if any(self._due(seq, ("forward",)) for seq in rows):
            raise Injected("the forward failed on this row")
        return super()._run_decode(rows)


@pytest.fixture(scope="module")
def engine(language_model):
    engine = Harness(language_model, BatchingConfig(max_prefill_tokens_per_step=128))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def alone(language_model, packed):
    """The victim's tokens alone, after checking that its answer has no near-tie."""
    margins = []

    class Margins(BatchingEngine):
        def _sample(self, seqs, logits):
            top2 = torch.topk(logits[0], 2).values
            margins.append(float(top2[0] - top2[1]))
            return super()._sample(seqs, logits)

    engine = Margins(language_model, BatchingConfig())
    try:
        answer = asyncio.run(collect(engine, request("alone", packed, *VICTIM)))
    finally:
        engine.shutdown()
    assert len(answer.tokens) == VICTIM[1]
    assert min(margins) > MARGIN, "choose a victim without near-ties"
    return answer.tokens


def features(packed, kind: str, where: int):
    """The packed tokens with their features spoiled as `kind` says, from row `where`."""
    values = packed.features.clone()
    row = where % values.shape[0]
    if kind == "nan":
        values[row, where % values.shape[1]] = math.nan
    elif kind == "inf":
        values[row] = -math.inf if where % 2 else math.inf
    elif kind == "huge":
        values[row:] = (1e4, -1e20, 1e30, FLOAT32_MAX)[where % 4]
    return dataclasses.replace(packed, features=values)


def victim(packed, request_id):
    return request(request_id, packed, *VICTIM)


async def beside(engine, packed, hostile, late: bool):
    """The hostile and a victim: the hostile first, or joining once the victim decodes."""
    started = asyncio.Event()
    if late:
        first = asyncio.create_task(collect(engine, victim(packed, "victim"), progress=started))
        await started.wait()
        tasks = [asyncio.create_task(collect(engine, hostile)), first]
    else:
        tasks = [asyncio.create_task(collect(engine, r))
                 for r in (hostile, victim(packed, "victim"))]
    return await asyncio.gather(*tasks, return_exceptions=True)


async def after(engine, packed):
    return await asyncio.gather(*(collect(engine, victim(packed, f"after-{i}"))
                                  for i in range(2)))


def run(engine, packed, hostile, late: bool):
    """The hostile beside a victim, then two victims at once, the first of them on the
    hostile's KV slots: the hostile's outcome and the victims'."""
    engine.slots.clear()
    outcome, answer = asyncio.run(asyncio.wait_for(beside(engine, packed, hostile, late),
                                                   TIMEOUT_S))
    blocks = engine.blocks  # the engine is idle
    blocks.release(blocks.take([], blocks.available))  # evicts every cached prefix
    below = blocks.take([], min(engine.slots["hostile"]) // blocks.block_size)
    try:
        later = asyncio.run(asyncio.wait_for(after(engine, packed), TIMEOUT_S))
    finally:
        blocks.release(below)
    return outcome, [answer, *later]


def isolated(engine, packed, alone, hostile, late: bool):
    """Run the scenario, check every victim and the engine's state; the hostile's outcome."""
    outcome, victims = run(engine, packed, hostile, late)
    for answer in victims:
        assert not isinstance(answer, BaseException), f"a victim failed: {answer!r}"
        assert answer.tokens == alone
    reused = (engine.slots["after-0"] | engine.slots["after-1"]) & engine.slots["hostile"]
    assert reused, "no victim ran on the hostile's KV slots"
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens_reserved) == (0, 0, 0)
    return outcome


@PROPERTY
@given(temperature=temperatures, top_p=top_ps, seed=seeds, max_new_tokens=st.integers(1, 40),
       stop=st.lists(st.text(min_size=1, max_size=4), max_size=3), ignore_eos=st.booleans(),
       late=st.booleans())
@example(temperature=1.5e-38, top_p=1.0, seed=0, max_new_tokens=40, stop=[], ignore_eos=True,
         late=True)
@example(temperature=1.4e-45, top_p=1.0, seed=0, max_new_tokens=40, stop=[], ignore_eos=True,
         late=False)
def test_no_sampling_parameters_change_or_end_a_greedy_answer_beside_them(
        engine, packed, alone, temperature, top_p, seed, max_new_tokens, stop, ignore_eos,
        late):
    engine.faults = {}
    params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop), ignore_eos)
    hostile = EngineRequest("hostile", packed, (("user", "Describe the photo."),), params)
    outcome = isolated(engine, packed, alone, hostile, late)
    assert not isinstance(outcome, BaseException), f"the hostile failed: {outcome!r}"
    assert outcome.finished.finish_reason in ("eos", "length", "stop")
    assert outcome.finished.completion_tokens <= max_new_tokens
    if ignore_eos and not stop:
        assert outcome.finished.completion_tokens == max_new_tokens


def hostile_with(packed, max_new_tokens, temperature=0.0, seed=0):
    return EngineRequest("hostile", packed, (("user", "Describe the photo."),),
                         SamplingParams(max_new_tokens, temperature, seed=seed, ignore_eos=True))


@PROPERTY
@given(spoil=st.sampled_from(["nan", "inf", "huge"]), where=st.integers(0, 10_000),
       temperature=st.sampled_from([0.0, 0.8, 1e-40]), max_new_tokens=st.integers(1, 24),
       late=st.booleans())
@example(spoil="nan", where=7, temperature=0.0, max_new_tokens=8, late=True)
@example(spoil="huge", where=3, temperature=0.0, max_new_tokens=8, late=False)
def test_features_with_nan_inf_or_huge_values_end_only_their_own_request(
        engine, packed, alone, spoil, where, temperature, max_new_tokens, late):
    """NaN and infinities reach the engine only past the service's check: they end their
    request at its first token; huge finite values may or may not overflow."""
    engine.faults = {}
    hostile = hostile_with(features(packed, spoil, where), max_new_tokens, temperature, where)
    outcome = isolated(engine, packed, alone, hostile, late)
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, NonFiniteLogitsError), repr(outcome)
        if spoil != "huge":  # huge values may overflow later; rounding in a batch decides
            assert "after 0 generated token" in str(outcome)
    else:
        assert spoil == "huge", "a NaN or an infinity in the features gave a finite answer"
        assert outcome.finished.completion_tokens == max_new_tokens


@st.composite
def faults(draw):
    """(kind, the token it strikes at, max_new_tokens)."""
    max_new_tokens = draw(st.integers(1, 24))
    return draw(st.sampled_from(FAULTS)), draw(st.integers(1, max_new_tokens)), max_new_tokens


EXPECTED = {"nan": NonFiniteLogitsError, "inf": NonFiniteLogitsError, "sample": RuntimeError,
            "text": Injected, "forward": Injected, "finish": Injected, "cancel": Injected}


@PROPERTY
@given(fault=faults(), temperature=st.sampled_from([0.0, 0.8, 1e-40]), late=st.booleans())
@example(fault=("nan", 3, 8), temperature=0.0, late=True)
@example(fault=("inf", 5, 8), temperature=0.8, late=True)
@example(fault=("sample", 3, 8), temperature=0.0, late=True)
@example(fault=("text", 4, 8), temperature=0.0, late=True)
@example(fault=("forward", 3, 8), temperature=0.0, late=True)
@example(fault=("finish", 1, 8), temperature=0.0, late=True)
@example(fault=("cancel", 3, 8), temperature=0.0, late=True)
def test_a_row_that_goes_bad_mid_answer_ends_alone(engine, packed, alone, fault, temperature,
                                                   late):
    kind, at, max_new_tokens = fault
    engine.faults = {"hostile": (kind, at)}
    outcome = isolated(engine, packed, alone, hostile_with(packed, max_new_tokens, temperature),
                       late)
    if kind == "forward" and at == 1:  # the first token comes from the prefill, no decode
        assert outcome.finished.completion_tokens == max_new_tokens
        return
    assert isinstance(outcome, EXPECTED[kind]), repr(outcome)
    if kind in ("nan", "inf"):
        assert f"after {at - 1} generated token" in str(outcome)

