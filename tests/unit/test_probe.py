"""The CLS-row probe against the eager attention matrix of the same tower."""

import pytest
import torch

from hero_core.encoder import VisionEncoder
from tests.conftest import noise_image


@pytest.fixture(scope="module")
def eager_tower(tiny_dir):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(
        tiny_dir / "llava", attn_implementation="eager")
    return model.model.vision_tower.eval()


@pytest.fixture(scope="module")
def pixels(vlm):
    from hero_core.tiling import tile_image

    return tile_image(noise_image(480, 640, seed=9), vlm.tiling)[0]


@pytest.mark.parametrize("layers", [(11, 22), (0, 5, 23)])
def test_probe_matches_the_eager_attention_row(eager_tower, pixels, layers):
    with torch.no_grad():
        reference = eager_tower(pixels, output_attentions=True).attentions
    encoded = VisionEncoder(eager_tower).encode(pixels, attention_layers=layers)
    for layer in layers:
        expected = reference[layer][:, :, 0, 1:].sum(1)  # CLS row, heads summed, CLS col dropped
        assert torch.allclose(encoded.attention[layer], expected, atol=1e-5, rtol=1e-4)


def test_probe_gives_the_same_rows_under_sdpa(eager_tower, vlm, pixels):
    sdpa = vlm.vision_encoder()
    assert vlm.model.model.vision_tower.config._attn_implementation == "sdpa"
    a = sdpa.encode(pixels, attention_layers=(11, 22)).attention
    b = VisionEncoder(eager_tower).encode(pixels, attention_layers=(11, 22)).attention
    for layer in (11, 22):
        assert torch.allclose(a[layer], b[layer], atol=1e-5, rtol=1e-4)


def test_features_are_the_stock_hidden_state_minus_two(vlm, pixels):
    tower = vlm.model.model.vision_tower
    with torch.no_grad():
        expected = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    encoded = vlm.vision_encoder().encode(pixels)
    assert torch.equal(encoded.features, expected)


def test_probe_leaves_no_hooks_behind(vlm, pixels):
    encoder = vlm.vision_encoder()

    def hook_count():
        return sum(len(m._forward_hooks) for m in encoder.tower.modules())

    before = hook_count()
    encoder.encode(pixels, attention_layers=(3, 11, 22), key_layers=(22,))
    assert hook_count() == before
    for layer in encoder.layers:
        assert not layer.self_attn.q_proj._forward_hooks
        assert not layer.self_attn.k_proj._forward_hooks
