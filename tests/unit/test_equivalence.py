"""Our path (tile, encode, select, pack, serialise, merge) against stock transformers.

At retention 1.0 the LLM must see exactly what `LlavaNextForConditionalGeneration`
builds from the stock processor, so greedy generation gives the same tokens.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

from hero_core.generation import build_inputs_embeds, format_prompt, generate_greedy
from hero_core.methods import create_method
from hero_core.serialization import packed_from_bytes, packed_to_bytes
from tests.conftest import noise_image

# (height, width) -> grid rows x cols; odd sizes on purpose.
SIZES = {(701, 699): (2, 2), (301, 603): (1, 2), (603, 301): (2, 1),
         (299, 1001): (1, 3), (1001, 299): (3, 1)}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def stock_processor(vlm, tiny_dir):
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(tiny_dir / "llava"),
        tokenizer=vlm.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)


def stock_run(vlm, processor, image, prompt):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits[0, -1]
        out = vlm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=vlm.tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), logits


@pytest.mark.parametrize("method", ["full", "hero"])
@pytest.mark.parametrize(("size", "grid"), list(SIZES.items()))
def test_equivalence_with_stock_generate_at_full_retention(vlm, pruner, stock_processor,
                                                           size, grid, method):
    image = noise_image(*size, seed=size[0])
    prompt = format_prompt(vlm.tokenizer, "What is shown in this picture?")
    expected_tokens, expected_logits = stock_run(vlm, stock_processor, image, prompt)

    result = pruner.prune(image, "What is shown in this picture?", create_method(method), 1.0)
    assert (result.grid.rows, result.grid.cols) == grid
    packed = packed_from_bytes(packed_to_bytes(result.packed))
    assert packed.num_embeddings == result.grid.full_token_count

    tokens = generate_greedy(vlm.model, vlm.tokenizer, packed, prompt, vlm.image_token_id,
                             NEW_TOKENS)
    assert tokens == expected_tokens
    input_ids = vlm.tokenizer(prompt, return_tensors="pt").input_ids[0]
    with torch.inference_mode():
        embeds = build_inputs_embeds(vlm.model, input_ids, packed, vlm.image_token_id)
        logits = vlm.model(inputs_embeds=embeds).logits[0, -1]
    assert torch.allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_equivalence_is_sensitive_to_the_image(vlm, pruner):
    """Guard: different images must give different logits, or the test above is vacuous."""
    prompt = format_prompt(vlm.tokenizer, "What is shown?")
    input_ids = vlm.tokenizer(prompt, return_tensors="pt").input_ids[0]
    logits = []
    for seed in (1, 2):
        packed = pruner.prune(noise_image(500, 500, seed), "", create_method("full"), 1.0).packed
        with torch.inference_mode():
            embeds = build_inputs_embeds(vlm.model, input_ids, packed, vlm.image_token_id)
            logits.append(vlm.model(inputs_embeds=embeds).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_pruned_generation_runs_with_fewer_tokens(vlm, pruner, photo):
    prompt = format_prompt(vlm.tokenizer, "What is the astronaut holding?")
    result = pruner.prune(photo, "What is the astronaut holding?", create_method("hero"), 0.111)
    assert result.packed.num_tokens == 320
    assert result.packed.num_embeddings < result.grid.full_token_count / 5
    tokens = generate_greedy(vlm.model, vlm.tokenizer, result.packed, prompt,
                             vlm.image_token_id, 4)
    assert len(tokens) == 4


def transparent_images() -> dict[str, Image.Image]:
    """Images with transparency whose hidden colours differ from what shows: an RGBA with
    varying alpha (vivid colours under fully transparent pixels), a grey LA, and a
    palette image with one colour marked transparent."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (520, 610, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (520, 610), dtype=np.uint8)
    alpha[:, :200] = 0  # fully transparent band: its colours must not reach the model
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA")
    palette = Image.fromarray(rgb).quantize(colors=64)
    palette.info["transparency"] = 3
    return {"RGBA": rgba, "LA": la, "P+transparency": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_transparent_images_match_the_stock_processor(vlm, pruner, stock_processor, mode):
    """Transparency is composited onto white, as the stock processor does, both for an
    image handed over in memory and for its PNG bytes decoded by the service."""
    import io

    from hero_core.image import decode_image

    image = transparent_images()[mode]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    decoded = decode_image(buf.getvalue())
    prompt = format_prompt(vlm.tokenizer, "What is shown in this picture?")
    expected, _ = stock_run(vlm, stock_processor, Image.open(io.BytesIO(buf.getvalue())),
                            prompt)
    for picture in (image, decoded):
        packed = pruner.prune(picture, "", create_method("full"), 1.0).packed
        assert generate_greedy(vlm.model, vlm.tokenizer, packed, prompt, vlm.image_token_id,
                               NEW_TOKENS) == expected
    if mode != "P+transparency":  # the hidden colours are gone: the clear band is white
        assert np.asarray(decoded)[:, :200].min() == 255
