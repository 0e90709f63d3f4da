"""The scheduler's admission past a request that does not fit (bounded by aging), KV
growing block by block, and preemption of the youngest when the pool runs out."""

from __future__ import annotations

from services.language.batching.sequence import Status
from tests.unit.test_engine_parts import scheduler, sequence


def test_a_request_that_does_not_fit_is_passed_by_at_most_max_bypass_later_ones():
    sched = scheduler(kv_tokens=100, batch=8, reserve=True, max_bypass=3)
    running = sequence(40, max_new=10)  # holds 50 of 100
    sched.add(running)
    assert sched.admit() == [running]
    large = sequence(60, max_new=10)  # needs 70: does not fit until `running` ends
    small = [sequence(5, max_new=5) for _ in range(5)]  # 10 each
    for seq in (large, *small):
        sched.add(seq)
    assert sched.admit() == small[:3]  # three pass the large one; then it is next
    assert large.bypassed == 3 and large.status is Status.WAITING
    assert list(sched.waiting) == [large, *small[3:]]
    assert sched.blocks.held == 80  # small[3] would fit (20 left), but may not pass
    assert sched.admit() == []
    for seq in small[:3]:  # the batch drains; nothing new takes KV
        sched.remove(seq)
    assert sched.admit() == []  # 50 free, large needs 70: still waits, alone at the front
    sched.remove(running)  # the last sequence running at its third bypass ends
    assert sched.admit() == [large, *small[3:]]
    assert large.bypassed == 3


def test_without_bypass_admission_is_first_come_first_served():
    sched = scheduler(kv_tokens=100, batch=8, reserve=True, max_bypass=0)
    running, large, small = sequence(40, 10), sequence(60, 10), sequence(5, 5)
    for seq in (running, large, small):
        sched.add(seq)
    assert sched.admit() == [running]
    assert sched.admit() == [] and large.bypassed == 0
    sched.remove(running)
    assert sched.admit() == [large, small]


def test_growing_admission_takes_only_the_prompt_and_keeps_a_watermark():
    sched = scheduler(kv_tokens=400, batch=8, block_size=4)  # 100 blocks, watermark 1
    first, second = sequence(200, max_new=400, arrival=0), sequence(197, 4, arrival=1)
    sched.add(first)
    sched.add(second)
    assert sched.admit() == [first]  # 50 blocks; reserving its answer would not fit
    assert len(first.blocks) == 50 and sched.watermark == 1
    assert sched.admit() == [] and second.bypassed == 0  # 50 blocks + 1 kept back > 50
    sched.remove(first)
    assert sched.admit() == [second] and len(second.blocks) == 50


def decode_ready(*seqs):
    """Mark sequences as having written their prompt and sampled one token."""
    for seq in seqs:
        seq.status, seq.cached = Status.DECODE, seq.prompt_length
        seq.text.add(ord("a"))


def fill(seq):
    """Decode until its last block is full."""
    while seq.cached < len(seq.blocks) * 4:
        seq.cached += 1
        seq.text.add(ord("b"))


def test_decoding_grows_by_a_block_and_preempts_the_youngest_when_the_pool_is_out():
    sched = scheduler(kv_tokens=32, batch=4, block_size=4)  # 8 blocks
    old, young = sequence(8, 20, arrival=0.0), sequence(8, 20, arrival=1.0)
    sched.add(old)
    sched.add(young)
    assert sched.admit() == [old, young]
    decode_ready(old, young)
    assert sched.decoding() == [old, young]  # each took a block for its 9th token
    assert (len(old.blocks), len(young.blocks), sched.blocks.available) == (3, 3, 2)
    fill(old)
    fill(young)
    assert sched.decoding() == [old, young] and sched.blocks.available == 0
    fill(old)
    fill(young)
    assert sched.decoding() == [old]  # the pool is out: the youngest makes room
    assert sched.preemptions == 1 and young.preemptions == 1
    assert young.status is Status.WAITING and list(sched.waiting) == [young]
    assert young.blocks == [] and young.cached == 0
    assert len(old.blocks) == 5 and sched.blocks.available == 3
    # back in, it recomputes its prompt and every generated token but the last
    assert young.generated == 9 and young.prefill_target == 16
    sched.remove(old)
    assert sched.admit() == [young] and young.status is Status.PREFILL
    assert len(young.blocks) == 4


def test_a_sequence_alone_is_never_preempted_by_itself_while_it_fits():
    sched = scheduler(kv_tokens=16, batch=2, block_size=4)
    only = sequence(4, 12)
    sched.add(only)
    sched.admit()
    decode_ready(only)
    for _ in range(3):
        assert sched.decoding() == [only]
        fill(only)
    assert len(only.blocks) == 4 and sched.preemptions == 0


def test_with_equal_arrival_times_the_later_admitted_is_the_younger():
    sched = scheduler(kv_tokens=24, batch=4, block_size=4)  # 6 blocks
    first, second = sequence(4, 20), sequence(8, 20)  # the same arrival time
    sched.add(first)
    sched.add(second)
    assert sched.admit() == [first, second]
    decode_ready(first, second)
    first.cached = 3  # room left in its block; the second needs a new one
    assert sched.decoding() == [first, second]
    fill(second)
    sched.blocks.take([], sched.blocks.available)  # the pool is out
    assert sched.decoding() == [first]  # not the first, already in this step's batch
    assert second.status is Status.WAITING and first.status is Status.DECODE
