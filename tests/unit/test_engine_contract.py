"""One contract, every engine: batched, sequential and vLLM answer alike.

The same requests run through each engine, and what the server relies on is checked
the same way: the token ids (the stock `generate` greedy answer, never the
end-of-sequence token unless `ignore_eos`), the finish reasons (`eos`, `length`,
`stop`, `cancelled`), the usage counts (completion tokens = token ids streamed; prompt
and visual tokens), stop strings (never in the text), cancel (closing the stream frees
the sequence, or aborts the vLLM request) and deadlines.

vLLM runs as `VllmEngine` around `StandInLLM` (tests/unit/vllm_standin.py), which
streams vLLM 0.30.0's own output classes shaped as vLLM fills them in DELTA mode; as
"vllm-merged" its outputs also arrive merged, as they do when the reader falls behind.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hero_core.generation import format_chat, generate_greedy
from hero_core.methods import create_method
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig
from services.language.decoding import SamplingParams
from services.language.model import EngineRequest
from services.language.sequential import SequentialEngine
from services.language.vllm_engine import VllmEngine
from tests.unit.test_batched_engine import collect
from tests.unit.vllm_standin import StandInLLM

QUESTION = "What is the astronaut holding?"
"""With `packed`, the tiny model ends its answer to this one after ~150 tokens."""
MAX = 256
ENGINES = ("batched", "sequential", "vllm", "vllm-merged")


@pytest.fixture(scope="module")
def packed(pruner, photo):
    return pruner.prune(photo, "What?", create_method("hero"), 0.111).packed


@pytest.fixture(scope="module")
def expected(language_model, packed):
    """Stock `generate`'s greedy answer to QUESTION, up to (without) end-of-sequence."""
    m = language_model
    prompt = format_chat(m.tokenizer, (("user", QUESTION),))
    tokens = generate_greedy(m.model, m.tokenizer, packed, prompt, m.image_token_id, MAX)
    assert tokens[-1] in m.eos_ids, "the tiny model no longer ends this answer early"
    return tokens[:-1]


@pytest.fixture(params=ENGINES)
def engine(request, language_model, embeddings_model):
    if request.param == "batched":
        built = BatchingEngine(language_model, BatchingConfig())
    elif request.param == "sequential":
        built = SequentialEngine(language_model, 2)
    else:
        eos = language_model.tokenizer.eos_token_id
        llm = StandInLLM(language_model.model, language_model.tokenizer, eos,
                         burst=4 if request.param == "vllm-merged" else 1)
        built = VllmEngine(embeddings_model, llm, dict, max_num_seqs=4)
    yield built
    built.shutdown()


def ask(packed, max_new_tokens, **params):
    return EngineRequest("contract", packed, (("user", QUESTION),),
                         SamplingParams(max_new_tokens, **params))


def run(engine, request, **kwargs):
    return asyncio.run(collect(engine, request, **kwargs))


def check_usage(answer, request, language_model):
    finished = answer.finished
    assert finished.completion_tokens == len(answer.tokens)
    assert finished.prompt_tokens == language_model.prompt_tokens(request)
    assert finished.visual_tokens == request.packed.num_embeddings


def wait_idle(engine, timeout_s=10.0):
    """Until the engine holds no sequence (the batched engine retires a closed one on
    its own thread, before its next step)."""
    until = time.monotonic() + timeout_s
    while engine.stats().running and time.monotonic() < until:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.kv_tokens_reserved == 0


def test_an_answer_ends_at_end_of_sequence_which_is_neither_streamed_nor_counted(
        engine, packed, expected, language_model):
    request = ask(packed, MAX)
    answer = run(engine, request)
    assert answer.finished.finish_reason == "eos"
    assert answer.tokens == expected
    assert not language_model.eos_ids & set(answer.tokens)
    assert answer.text == language_model.tokenizer.decode(expected, skip_special_tokens=True)
    check_usage(answer, request, language_model)


def test_max_new_tokens_ends_an_answer_with_length(engine, packed, expected, language_model):
    request = ask(packed, 24)
    answer = run(engine, request)
    assert answer.finished.finish_reason == "length"
    assert answer.tokens == expected[:24]
    check_usage(answer, request, language_model)


def test_with_ignore_eos_end_of_sequence_is_streamed_and_counted_like_any_token(
        engine, packed, expected, language_model):
    request = ask(packed, len(expected) + 8, ignore_eos=True)
    answer = run(engine, request)
    assert answer.finished.finish_reason == "length"
    assert len(answer.tokens) == len(expected) + 8
    assert answer.tokens[:len(expected)] == expected
    assert answer.tokens[len(expected)] in language_model.eos_ids
    check_usage(answer, request, language_model)


def stop_string(text: str) -> str:
    """Three letters that first occur some way into `text`."""
    return next(text[i:i + 3] for i in range(10, len(text) - 3)
                if text[i:i + 3].isascii() and text[i:i + 3].isalpha()
                and text.find(text[i:i + 3]) == i)


def test_a_stop_string_ends_the_text_before_it(engine, packed, expected, language_model):
    full = language_model.tokenizer.decode(expected, skip_special_tokens=True)
    stop = stop_string(full)
    request = ask(packed, MAX, stop=(stop,))
    answer = run(engine, request)
    assert answer.finished.finish_reason == "stop"
    assert answer.text == full[:full.find(stop)]
    assert stop not in answer.text
    # the tokens that made the stop string were streamed (and counted), no more
    assert answer.tokens == expected[:len(answer.tokens)]
    made = language_model.tokenizer.decode(answer.tokens, skip_special_tokens=True)
    assert stop in made
    assert stop not in language_model.tokenizer.decode(answer.tokens[:-1],
                                                       skip_special_tokens=True)
    check_usage(answer, request, language_model)


def test_closing_the_stream_ends_the_generation_and_frees_its_place(engine, packed,
                                                                    language_model):
    request = ask(packed, MAX, ignore_eos=True)
    answer = run(engine, request, stop_after=3)
    assert answer.finished is None and 3 <= len(answer.tokens) < MAX
    wait_idle(engine)
    if isinstance(engine, VllmEngine):
        assert any(a.startswith("contract-") for a in engine.llm.aborted)
        assert not engine.llm.running
    # the place is free: the next request runs to its end
    assert run(engine, ask(packed, 8)).finished.finish_reason == "length"


def test_a_request_past_its_deadline_ends_cancelled_without_tokens(engine, packed,
                                                                   language_model):
    request = ask(packed, MAX)
    answer = run(engine, request, deadline=time.monotonic() - 1)
    assert answer.finished.finish_reason == "cancelled"
    assert answer.tokens == [] and answer.text == ""
    check_usage(answer, request, language_model)
    wait_idle(engine)


def test_a_deadline_that_passes_mid_answer_ends_it_cancelled(engine, packed, language_model):
    request = ask(packed, 4000, ignore_eos=True)
    started = time.monotonic()
    answer = run(engine, request, deadline=started + 0.5)
    assert answer.finished.finish_reason == "cancelled"
    assert len(answer.tokens) < 4000
    assert time.monotonic() - started < 5
    check_usage(answer, request, language_model)
    wait_idle(engine)
    if isinstance(engine, VllmEngine):
        assert any(a.startswith("contract-") for a in engine.llm.aborted)


@pytest.mark.parametrize("engine", ["batched", "sequential"], indirect=True)
def test_a_seed_reproduces_a_sampled_answer_and_no_seed_draws_a_fresh_one(engine, packed):
    def sample(seed):
        request = ask(packed, 64, ignore_eos=True, temperature=1.0, seed=seed)
        return run(engine, request).tokens

    assert sample(0) == sample(0)
    assert sample(7) == sample(7)
    assert sample(0) != sample(7)
    unseeded = [sample(None) for _ in range(3)]
    assert len({tuple(t) for t in unseeded}) == 3
    assert sample(0) not in unseeded  # unset is not seed 0
