import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hero_core.budget import allocate, total_budget, zscore


@settings(max_examples=1000, deadline=None)
@given(total=st.integers(0, 5000),
       weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=8),
       data=st.data())
def test_allocation_sums_exactly_and_respects_caps(total, weights, data):
    caps = data.draw(st.lists(st.integers(0, 700), min_size=len(weights),
                              max_size=len(weights)))
    alloc = allocate(total, weights, caps)
    assert sum(alloc) == min(total, sum(caps))
    assert all(0 <= a <= c for a, c in zip(alloc, caps, strict=True))


def test_largest_remainder_breaks_ties_by_lower_index():
    assert allocate(10, [1, 1, 1], [100, 100, 100]) == [4, 3, 3]
    assert allocate(2, [1, 1, 1], [100, 100, 100]) == [1, 1, 0]


def test_overflow_goes_to_uncapped_entries_in_proportion():
    assert allocate(100, [8, 1, 1], [10, 100, 100]) == [10, 45, 45]


def test_zero_weights_share_only_what_weighted_entries_cannot_take():
    assert allocate(30, [1, 0, 0], [10, 100, 100]) == [10, 10, 10]
    assert allocate(10, [1, 0, 0], [10, 100, 100]) == [10, 0, 0]


@pytest.mark.parametrize(("ratio", "crops", "expected"),
                         [(1.0, 5, 2880), (0.222, 5, 639), (0.111, 5, 320), (0.056, 5, 161),
                          (0.5, 3, 864)])
def test_total_budget_rounds_half_up(ratio, crops, expected):
    assert total_budget(ratio, 576, crops) == expected


def test_zscore_is_zero_when_flat_and_standardised_otherwise():
    assert torch.equal(zscore(torch.ones(4)), torch.zeros(4, dtype=torch.float64))
    z = zscore(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert abs(float(z.mean())) < 1e-12
    assert abs(float(z.std(unbiased=False)) - 1.0) < 1e-12
