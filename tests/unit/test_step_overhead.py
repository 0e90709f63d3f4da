"""What each decode step costs besides the forward: sampling the whole batch at once and
incremental detokenization, each exactly equal to the per-row and whole-text way."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.language.decoding import (
    SamplingParams,
    TextStream,
    held_back,
    sample,
    sample_rows,
)
from tests.unit.test_sampling import seeds, temperatures, top_ps

row_params = st.builds(SamplingParams, temperature=temperatures, top_p=top_ps, seed=seeds)


@settings(max_examples=60, deadline=None)
@given(st.lists(row_params, min_size=1, max_size=8), st.integers(0, 2**31 - 1))
def test_a_batch_samples_every_row_as_it_would_be_sampled_alone(params, data_seed):
    logits = torch.randn(len(params), 300, generator=torch.Generator().manual_seed(data_seed))
    logits *= torch.rand(len(params), 1) * 20
    batch = sample_rows(logits, params, [torch.Generator().manual_seed(p.seed) for p in params])
    alone = [sample(logits[i], p, torch.Generator().manual_seed(p.seed))
             for i, p in enumerate(params)]
    assert batch == alone


def test_sampling_follows_the_distribution_it_draws_from():
    """Drawn by inverting the cumulative distribution of the top-p set: the frequencies
    match the probabilities."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0])
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=11)
    generator = torch.Generator().manual_seed(11)
    draws = sample_rows(logits.expand(4000, 5), [params] * 4000, [generator] * 4000)
    freq = torch.bincount(torch.tensor(draws), minlength=5).double() / 4000
    probs = torch.softmax(logits.double() / 0.7, 0)
    kept = probs[:3] / probs[:3].sum()  # mass before the fourth is 0.946, then 0.990
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], kept, atol=0.03)


class WholeText:
    """The reference: the whole answer decoded again at every token."""

    def __init__(self, tokenizer, params):
        self.tokenizer, self.params, self.ids, self.sent = tokenizer, params, [], ""

    def add(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.sent = text[len(self.sent):cut], text[:cut]
            return out, True
        ready = len(text) - held_back(text, self.params.stop)
        if not text.endswith("\ufffd") and ready > len(self.sent):
            out, self.sent = text[len(self.sent):ready], text[:ready]
            return out, False
        return "", False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**16), min_size=1, max_size=40),
       st.lists(st.sampled_from(["a", "e ", "th", "\n", "??"]), max_size=2))
def test_incremental_detokenization_streams_what_decoding_the_whole_text_streams(vlm, ids,
                                                                                 stop):
    """On the tiny model's tokenizer (byte-level BPE: random ids make broken UTF-8 too)."""
    tokenizer = vlm.tokenizer
    ids = [i % len(tokenizer) for i in ids]
    params = SamplingParams(len(ids), stop=tuple(stop), ignore_eos=True)
    stream, whole = TextStream(tokenizer, params, frozenset()), WholeText(tokenizer, params)
    for token in ids:
        delta = stream.add(token)
        expected, stopped = whole.add(token)
        assert (delta.text if delta else "") == expected
        if stopped:
            assert stream.reason == "stop"
            return
    assert stream.reason == "length"
    last = stream.finish()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.sent == text and (last is None or text.endswith(last.text))


def test_a_long_answer_decodes_only_a_short_window_per_token():
    class Counting:
        def __init__(self):
            self.decoded = 0

        def decode(self, ids, skip_special_tokens=True):
            self.decoded += len(ids)
            return "".join(chr(97 + i % 26) for i in ids)

    counting = Counting()
    stream = TextStream(counting, SamplingParams(2000, ignore_eos=True), frozenset())
    for i in range(2000):
        stream.add(i)
    assert len(stream.sent) == 2000
    assert counting.decoded < 4 * 2000  # the whole text each time: 2,001,000
