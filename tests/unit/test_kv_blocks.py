"""KV blocks: chained block hashes over a sequence's inputs, reference counts, and
least-recently-used eviction of cached blocks no sequence holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loadtest.micro.prefix_share import common_prefix
from services.language.batching.blocks import BlockManager, block_hash
from services.language.batching.prefix import PrefixKeys
from services.language.decoding import SamplingParams
from services.language.model import EngineRequest

BLOCK = 16


def test_a_block_hash_covers_its_inputs_and_every_block_before_it():
    ids = [list(range(i * 4, i * 4 + 4)) for i in range(3)]

    def chain(blocks, visual=b""):
        out, parent = [], b""
        for block in blocks:
            parent = block_hash(parent, block, visual)
            out.append(parent)
        return out

    base = chain(ids)
    assert chain(ids) == base  # deterministic
    changed = chain([ids[0], [4, 5, 6, 99], ids[2]])
    assert changed[0] == base[0]
    assert changed[1] != base[1] and changed[2] != base[2]  # the same block 2, after a change
    assert chain(ids, visual=b"\x00")[0] != base[0]


def test_held_blocks_are_shared_by_reference_and_free_ones_hand_out_lowest_first():
    blocks = BlockManager(6, 4)
    a = blocks.take([], 2)
    blocks.register(a[0], b"h0")
    blocks.register(a[1], b"h1")
    b = blocks.take(blocks.lookup([b"h0", b"h1", b"h2"]), 1)
    assert a == [0, 1] and b == [0, 1, 2]
    assert blocks.refs[:3] == [2, 2, 1] and blocks.held == 3
    blocks.release(a)
    assert blocks.held == 3 and blocks.available == 3  # b still holds 0 and 1
    blocks.release(b)
    assert blocks.held == 0 and blocks.cached == 2
    assert blocks.take([], 1) == [2]  # a block holding nothing reusable goes first


def test_cached_blocks_no_one_holds_are_evicted_least_recently_used():
    blocks = BlockManager(4, 4)
    first, second = blocks.take([], 2), blocks.take([], 2)
    for block, h in zip(first + second, (b"a0", b"a1", b"b0", b"b1"), strict=True):
        blocks.register(block, h)
    blocks.release(first)  # released last block first: a1 is evicted before a0
    blocks.release(second)
    assert blocks.available == 4 and blocks.cached == 4
    hits = blocks.lookup([b"a0", b"a1"])
    assert hits == first
    taken = blocks.take(hits[:1], 1)  # a0 again, and one new block: a1's goes first
    assert taken == [first[0], first[1]]
    assert blocks.lookup([b"a0", b"a1"]) == [first[0]]
    assert blocks.take([], 1) == [second[1]]  # then b1's: b0 was released after it
    assert blocks.lookup([b"b0"]) == [second[0]] and blocks.lookup([b"b1"]) == []


def test_a_prefix_cached_twice_keeps_its_first_block_and_caching_can_be_off():
    blocks = BlockManager(4, 4)
    one, two = blocks.take([], 1), blocks.take([], 1)
    blocks.register(one[0], b"x")
    blocks.register(two[0], b"x")
    assert blocks.lookup([b"x"]) == one and blocks.hashes[two[0]] is None
    off = BlockManager(4, 4, prefix_cache=False)
    off.register(off.take([], 1)[0], b"x")
    assert off.lookup([b"x"]) == [] and off.cached == 0


def keys(language_model, packed, question="What is the astronaut holding?"):
    request = EngineRequest("r", packed, (("user", question),), SamplingParams())
    return PrefixKeys(language_model.prompt_ids(request), packed,
                      language_model.image_token_id, BLOCK)


def full_blocks(k):
    return len(k.prompt_ids) // BLOCK


def test_questions_about_the_same_kept_tokens_share_every_block_through_the_image(
        language_model, packed):
    """The prompt puts the image before the question, so two questions share the text
    before the image and every visual token."""
    one, two = keys(language_model, packed), keys(language_model, packed, "Describe it.")
    assert one.image_start < 10 and one.image_end == one.image_start + packed.num_embeddings
    a, b = one.upto(full_blocks(one), []), two.upto(full_blocks(two), [])
    assert one.prompt_ids[:one.image_end] == two.prompt_ids[:two.image_end]
    assert common_prefix(a, b) >= one.image_end // BLOCK


def spoiled(packed, token, **change):
    """The packed tokens with kept token `token` changed: its features nudged, or (with
    `col`) kept from another place."""
    if "col" in change:
        col = packed.col.clone()
        col[token] = change["col"]
        return dataclasses.replace(packed, col=col)
    features = packed.features.clone()
    features[token, 0] += 1e-3
    return dataclasses.replace(packed, features=features)


@pytest.mark.parametrize("token", [0, 40, 200])
@pytest.mark.parametrize("change", [{}, {"col": 23}])
def test_kept_tokens_that_differ_in_one_index_share_nothing_from_its_block_on(
        language_model, packed, token, change):
    base, other = keys(language_model, packed), keys(language_model,
                                                     spoiled(packed, token, **change))
    n = full_blocks(base)
    a, b = base.upto(n, []), other.upto(n, [])
    newlines = int(packed.newline_after[:token].sum())
    position = base.image_start + token + newlines
    assert common_prefix(a, b) == position // BLOCK
    assert all(x != y for x, y in zip(a[position // BLOCK:], b[position // BLOCK:],
                                      strict=True))


def test_the_same_values_in_another_dtype_are_another_input(language_model, packed):
    half = dataclasses.replace(packed, features=packed.features.to(torch.float16))
    rounded = dataclasses.replace(packed, features=half.features.to(torch.float32))
    a, b = keys(language_model, rounded), keys(language_model, half)
    assert common_prefix(a.upto(full_blocks(a), []), b.upto(full_blocks(b), [])) == (
        a.image_start // BLOCK)


def test_generated_tokens_extend_the_chain_once_their_blocks_are_known(language_model,
                                                                      packed):
    k = keys(language_model, packed)
    prompt = len(k.prompt_ids)
    n = -(-prompt // BLOCK)  # the block holding the prompt's end and the first answers
    with pytest.raises(ValueError, match="not all known"):
        k.upto(n, [])
    answer = list(range(5, 5 + BLOCK))
    first = k.upto(n, answer)
    other = keys(language_model, packed).upto(n, [7, *answer[1:]])
    assert first[:n - 1] == other[:n - 1] and first[n - 1] != other[n - 1]


def test_the_kv_cache_must_hold_a_block():
    from pydantic import ValidationError

    from services.language.config import BatchingConfig

    with pytest.raises(ValidationError, match="at least one block"):
        BatchingConfig(kv_cache_tokens=16, block_size=32)
    assert BatchingConfig(kv_cache_tokens=32, block_size=32).block_size == 32
