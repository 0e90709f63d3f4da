"""Sampling is defined for every accepted parameter value, and a row that cannot be
sampled fails alone.

The service accepts temperatures in [0, 2] (a float32 on the wire, so down to the
smallest subnormal, 1.4e-45), top_p in [0, 1] (0 = off, 1.0), and any uint64 seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.language.decoding import (
    NonFiniteLogitsError,
    SamplingParams,
    generator_for,
    probabilities,
    sample,
    sample_rows,
)

TINY_TEMPERATURES = [5e-324, 1.4e-45, 1.5e-38, 2.2e-38, 3e-38, 1e-30]
"""Smallest float64 and float32 subnormals, the reported range, and one above it."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

temperatures = st.one_of(
    st.sampled_from([0.0, 2.0, *TINY_TEMPERATURES]),
    st.floats(0.0, 2.0, width=32, allow_subnormal=True),
    st.floats(0.0, 2.0, allow_subnormal=True))
top_ps = st.one_of(st.sampled_from([1.0, 5e-324, 1.4e-45, 0.5, math.nextafter(1.0, 0.0)]),
                   st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=True))
seeds = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]),
                  st.integers(0, 2**64 - 1))
finite_scores = st.floats(width=32, allow_nan=False, allow_infinity=False,
                          allow_subnormal=True)
score_rows = st.lists(st.one_of(finite_scores, st.just(-math.inf),
                                st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX])),
                      min_size=1, max_size=40).filter(lambda row: max(row) > -math.inf)


def generator(seed: int | None = 0) -> torch.Generator:
    return generator_for(SamplingParams(seed=seed))


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e30])
def test_a_temperature_too_small_to_divide_by_picks_the_greedy_token(temperature, dtype,
                                                                     scale):
    if dtype is torch.float16:
        scale = min(scale, 1e4)  # float16 ends at 65504
    logits = (torch.randn(1000, generator=generator(1)) * scale).to(dtype)
    params = SamplingParams(temperature=temperature, seed=7)
    picks = {sample(logits, params, generator(seed)) for seed in range(20)}
    assert picks == {int(torch.argmax(logits))}


@settings(max_examples=300, deadline=None)
@given(score_rows, temperatures, top_ps, seeds)
@example([0.0, -1.0, 3.0], 1.4e-45, 1.0, 0)
@example([FLOAT32_MAX, -FLOAT32_MAX, 0.0], 5e-324, 5e-324, 2**64 - 1)
@example([0.0, 1.401298464324817e-45], 2.0, 5e-324, 0)  # softmax ties what the logits order
def test_every_accepted_parameter_gives_a_valid_token(row, temperature, top_p, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    token = sample(logits, params, generator(seed))
    assert 0 <= token < len(row)
    assert logits[token] > -math.inf
    if temperature > 0:
        probs = probabilities(logits, temperature, top_p)
        assert bool(torch.isfinite(probs).all()) and float(probs.min()) >= 0.0
        assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)
        assert float(probs[logits == logits.max()].sum()) > 0.0  # a top token always stays


@pytest.mark.parametrize("row", [[0.0, 1.401298464324817e-45], [1e-20, 0.0, 2e-20, 1.5e-20],
                                 [0.0, -1e-30, 1e-30, -math.inf]])
def test_the_smallest_top_p_keeps_the_greedy_token_where_softmax_ties_it_with_another(row):
    """Logits closer than float64's softmax can tell apart give equal probabilities; the
    token a top-p of one token keeps is still the logits' argmax, as greedy decoding's."""
    logits = torch.tensor(row, dtype=torch.float32)
    greedy = sample(logits, SamplingParams(temperature=0.0), generator())
    assert {sample(logits, SamplingParams(temperature=2.0, top_p=1e-9, seed=seed),
                   generator(seed)) for seed in range(10)} == {greedy}


def test_top_p_keeps_the_smallest_set_holding_that_mass_and_never_nothing():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(0)
    kept = [int((probabilities(logits, 1.0, top_p) > 0).sum())
            for top_p in (5e-324, 0.5, 0.75, 0.95, math.nextafter(1.0, 0.0), 1.0)]
    assert kept == [1, 1, 2, 3, 4, 4]  # mass 0.64, 0.88, 0.97, 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_nan_or_infinite_logits_give_a_typed_error_naming_the_token(bad, temperature):
    logits = torch.tensor([0.0, 1.0, bad])
    with pytest.raises(NonFiniteLogitsError, match="after 5 generated token"):
        sample(logits, SamplingParams(temperature=temperature), generator(), 5)
    with pytest.raises(NonFiniteLogitsError):
        sample(torch.full((3,), -math.inf), SamplingParams(temperature=temperature),
               generator())


def test_a_row_that_cannot_be_sampled_fails_alone_and_the_others_are_as_if_alone():
    logits = torch.randn(5, 50, generator=generator(3))
    logits[1, 7] = math.nan
    logits[3] = -math.inf
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=1),
              SamplingParams(temperature=1.3, top_p=0.8, seed=2),
              SamplingParams(temperature=0.5, seed=3),
              SamplingParams(temperature=math.nan, seed=4)]  # fails inside the sampler
    out = sample_rows(logits, params, [generator(p.seed) for p in params], [0, 4, 0, 9, 2])
    assert isinstance(out[1], NonFiniteLogitsError) and "after 4 generated" in str(out[1])
    assert isinstance(out[3], NonFiniteLogitsError) and "after 9 generated" in str(out[3])
    assert isinstance(out[4], RuntimeError)
    for i in (0, 2):
        assert out[i] == sample(logits[i], params[i], generator(params[i].seed))
