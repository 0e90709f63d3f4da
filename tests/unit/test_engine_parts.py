import torch

from services.language.engine import SamplingParams, held_back, sample


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
