"""The prefix-sharing benchmark (`loadtest/micro/prefix_share.py`) counts what the engine
would share: every block of the visual prefix for the same kept tokens, and exactly the
blocks before the first kept token that differs otherwise."""

from __future__ import annotations

import pytest

from loadtest.micro.prefix_share import common_prefix, visual_prefix
from tests.unit.test_kv_blocks import spoiled


def test_the_same_kept_tokens_share_the_whole_visual_prefix_whatever_the_question(vlm,
                                                                                  packed):
    a = visual_prefix(vlm.tokenizer, vlm.image_token_id, packed, "What is held?")
    b = visual_prefix(vlm.tokenizer, vlm.image_token_id, packed, "Which colour is it?")
    assert len(a) == len(b) == (7 + packed.num_embeddings) // 16  # "USER: " first
    assert common_prefix(a, b) == len(a)


@pytest.mark.parametrize("token", [0, 100])
def test_kept_tokens_differing_at_one_token_share_only_the_blocks_before_it(vlm, packed,
                                                                           token):
    a = visual_prefix(vlm.tokenizer, vlm.image_token_id, packed, "What is held?")
    b = visual_prefix(vlm.tokenizer, vlm.image_token_id, spoiled(packed, token),
                      "What is held?")
    position = 7 + token + int(packed.newline_after[:token].sum())
    assert common_prefix(a, b) == position // 16 < len(a)
