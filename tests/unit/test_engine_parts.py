import torch

from services.language.batching.blocks import BlockManager
from services.language.batching.scheduler import Policy, Scheduler
from services.language.batching.sequence import Sequence, Status
from services.language.decoding import (
    SamplingParams,
    TextStream,
    generator_for,
    held_back,
    sample,
    sample_rows,
)
from services.language.model import EngineRequest


def test_text_that_may_start_a_stop_string_is_held_back():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("world",)) == 0
    assert held_back("ab", ("bc", "abc")) == 2


def test_greedy_is_argmax_and_sampling_respects_top_p():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0.0), gen) == 1
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(50)}
    assert picks == {1}
    wide = {sample(logits, SamplingParams(temperature=1.0, top_p=1.0), gen) for _ in range(200)}
    assert {1, 2} <= wide


def test_rows_sample_with_their_own_parameters_and_generators():
    logits = torch.tensor([[0.0, 5.0, 4.9], [3.0, 0.0, 2.9], [0.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=4)]

    def draw():
        generators = [generator_for(p) for p in params]
        return [sample_rows(logits, params, generators) for _ in range(20)]
    first = draw()
    assert all(row[:2] == [1, 0] for row in first)  # greedy rows: argmax
    assert first == draw()  # the sampled row reproduces from its seed
    assert len({row[2] for row in first}) > 1


def test_a_seed_reproduces_and_no_seed_draws_fresh_randomness():
    def draws(seed):
        return torch.rand(8, generator=generator_for(SamplingParams(seed=seed))).tolist()
    assert draws(0) == draws(0) and draws(7) == draws(7)
    assert draws(0) != draws(7)
    assert draws(None) != draws(None)
    assert draws(None) != draws(0)  # unset is not seed 0


class Chars:
    """A tokenizer whose token i is the character chr(i); 0 is end of sequence."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def feed(text, params):
    stream = TextStream(Chars(), params, frozenset({0}))
    deltas = []
    for c in text:  # as the engines do: no more tokens once the stream is done
        if not stream.done:
            deltas.append(stream.add(ord(c) if c != "$" else 0))
    deltas.append(stream.finish())
    return "".join(d.text for d in deltas if d), stream.reason


def test_text_stream_ends_at_eos_stop_strings_and_length():
    assert feed("hi$", SamplingParams(10)) == ("hi", "eos")
    assert feed("hi$there", SamplingParams(10, ignore_eos=True)) == ("hithere", "length")
    assert feed("say END now", SamplingParams(20, stop=("END",))) == ("say ", "stop")
    assert feed("abcdef", SamplingParams(3)) == ("abc", "length")
    # text that may begin a stop string waits, and goes out once it cannot
    stream = TextStream(Chars(), SamplingParams(10, stop=("ab",)), frozenset())
    assert stream.add(ord("x")).text == "x"
    assert stream.add(ord("a")) is None
    assert stream.add(ord("c")).text == "ac"


def test_every_counted_token_is_streamed_the_stop_string_and_eos_are_not():
    for text, params, reason in [("say END now", SamplingParams(20, stop=("END",)), "stop"),
                                 ("xEND", SamplingParams(20, stop=("x", "END")), "stop"),
                                 ("abENDc", SamplingParams(20, stop=("ENDc",)), "stop"),
                                 ("hi$", SamplingParams(10), "eos"),
                                 ("a$b$", SamplingParams(4, ignore_eos=True), "length")]:
        stream = TextStream(Chars(), params, frozenset({0}))
        deltas = []
        for c in text:
            if not stream.done:
                deltas.append(stream.add(ord(c) if c != "$" else 0))
        deltas = [d for d in [*deltas, stream.finish()] if d is not None]
        streamed = [t for d in deltas for t in d.token_ids]
        assert stream.reason == reason
        assert streamed == stream.ids, text
        assert not any(stop in "".join(d.text for d in deltas) for stop in params.stop)
        assert (0 in streamed) == params.ignore_eos


def sequence(prompt, max_new=4, arrival=0.0):
    request = EngineRequest("r", None, (("user", "q"),), SamplingParams(max_new))
    text = TextStream(Chars(), request.params, frozenset())
    return Sequence(request, prompt, text, lambda events: None, submitted_at=arrival)


def scheduler(kv_tokens=100, batch=3, chunk=8, block_size=1, **policy):
    blocks = BlockManager(kv_tokens // block_size, block_size, prefix_cache=False)
    return Scheduler(blocks, Policy(batch, chunk, **policy))


def test_reserving_first_come_first_served_admits_by_kv_tokens_and_batch_places():
    sched = scheduler(kv_tokens=100, batch=2, reserve=True, max_bypass=0)
    a, b, c, d = sequence(40), sequence(60), sequence(6), sequence(1)
    for s in (a, b, c, d):
        sched.add(s)
    assert [s.most_tokens for s in (a, b, c, d)] == [44, 64, 10, 5]
    assert sched.admit() == [a]  # b needs 64 of the 56 left; c fits but waits behind b
    assert sched.blocks.held == 44 and c.status is Status.WAITING
    sched.remove(a)
    assert a.slots is None and sched.blocks.held == 0
    assert sched.admit() == [b, c]  # d fits in KV, but both batch places are taken
    assert sched.blocks.held == 74 and list(sched.waiting) == [d]
    sched.remove(c)
    assert sched.admit() == [d]
    for s in list(sched.running):
        sched.remove(s)
    assert sched.blocks.held == 0 and sched.idle


def test_prefill_goes_whole_when_nobody_decodes_and_in_budgeted_chunks_otherwise():
    sched = scheduler(kv_tokens=200, batch=4, chunk=8)
    first, second, third = sequence(20), sequence(6), sequence(30)
    for s in (first, second, third):
        sched.add(s)
    sched.admit()
    (whole,) = sched.prefill_chunks()
    assert (whole.sequence, whole.start, whole.end) == (first, 0, 20)
    first.cached, first.status = 20, Status.DECODE
    chunks = sched.prefill_chunks()
    assert [(c.sequence, c.start, c.end) for c in chunks] == [(second, 0, 6), (third, 0, 2)]
    assert sched.decoding() == [first]
