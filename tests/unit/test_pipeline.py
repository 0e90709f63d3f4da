import pytest

from hero_core.config import Limits
from hero_core.errors import ConfigError, InvalidRatioError, PromptTooLongError
from hero_core.methods import create_method
from hero_core.pipeline import Pruner


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0001, float("nan"), "0.5"])
def test_ratio_outside_zero_one_is_refused(pruner, photo, ratio):
    with pytest.raises(InvalidRatioError, match=r"\(0, 1\]"):
        pruner.prune(photo, "q", create_method("hero"), ratio)


def test_over_long_prompt_names_the_limit(vlm, photo):
    pruner = Pruner(vlm.vision_encoder(), vlm.tiling, vlm.text_encoder, Limits(max_prompt_chars=8))
    with pytest.raises(PromptTooLongError, match="max_prompt_chars=8"):
        pruner.prune(photo, "a question that is too long", create_method("hero"), 0.5)


def test_a_method_reading_a_missing_layer_is_refused(pruner, photo):
    with pytest.raises(ConfigError, match="layer 40"):
        pruner.prune(photo, "q", create_method("fastervlm", layer=40), 0.5)


def test_relevance_is_off_without_a_text_tower(vlm, photo):
    blind = Pruner(vlm.vision_encoder(), vlm.tiling, text=None)
    method = create_method("hero")
    assert blind.embed_question("what?", method) is None
    result = blind.prune(photo, "what?", method, 0.111)
    assert result.packed.num_tokens == 320


def test_the_question_moves_only_tile_tokens_on_a_real_photo(pruner, photo):
    hero = create_method("hero")
    a = pruner.prune(photo, "the flag in the top left corner", hero, 0.111)
    b = pruner.prune(photo, "the helmet at the bottom right", hero, 0.111)
    assert a.packed.counts_per_crop()[0] == b.packed.counts_per_crop()[0]
    assa = a.selection.indices[0].sort().values
    assert (assa == b.selection.indices[0].sort().values).all()
    assert a.packed.num_tokens == b.packed.num_tokens == 320


def test_model_specs_resolve_presets_bundles_and_hub_ids(tmp_path, tiny_dir):
    from hero_core.errors import ModelLoadError
    from hero_core.models import resolve_spec

    tiny = resolve_spec("tiny", tiny_dir.parent, device="cpu", dtype="float16")
    assert tiny.model.endswith("tiny/llava") and tiny.text_tower.endswith("tiny/clip")
    assert tiny.local_files_only and tiny.dtype == "float16"
    bundle = resolve_spec(str(tiny_dir), tmp_path)
    assert bundle.text_tower == str(tiny_dir / "clip")
    hub = resolve_spec("llava-v1.6-vicuna-7b", tmp_path, device="cuda")
    assert hub.model == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert hub.text_tower == "openai/clip-vit-large-patch14-336"
    assert resolve_spec("someone/llava-next-ft", tmp_path).model == "someone/llava-next-ft"
    with pytest.raises(ModelLoadError, match="make setup"):
        resolve_spec("tiny", tmp_path)
