"""The lmms-eval adapter's request path on the offline tiny model.

Requests are lmms-eval's own `Instance` objects (its `api.instance` module needs no
third-party package); the `lmms` subclass itself needs lmms-eval's dependencies and
is not built here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

from evals.lmms import lmms
from evals.lmms.answerer import (
    Answerer,
    AnswererConfig,
    GenerationSettings,
    cut_at_stop,
    load_answerer,
    settings_from_gen_kwargs,
    spec_for,
)
from hero_core.errors import ConfigError, InvalidInputError
from hero_core.methods import create_method
from tests.conftest import ROOT, noise_image

QUESTION = "What is shown in this picture?\nAnswer the question using a single word or phrase."
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def full(vlm):
    return Answerer(vlm, create_method("full"), 1.0)


@pytest.fixture(scope="module")
def stock_processor(vlm, tiny_dir):
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(tiny_dir / "llava"),
        tokenizer=vlm.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def image():
    return noise_image(301, 603, seed=3)


def docs(*images):
    """A task_dict holding one document per image list, and its doc_to_visual."""
    return {"demo": {"test": [{"visuals": list(v)} for v in images]}}, lambda d: d["visuals"]


def request(kind, args, doc_id=0):
    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": "demo", "doc_id": doc_id, "repeats": 1})


def test_full_retention_answer_equals_stock_generate(vlm, full, stock_processor, image):
    prompt = full.prompt(QUESTION)
    inputs = stock_processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=vlm.tokenizer.pad_token_id)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()

    assert full.generate_tokens(image, QUESTION, GenerationSettings(NEW_TOKENS)) == expected
    task_dict, to_visual = docs([image])
    gen_kwargs = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "do_sample": False}
    answers = lmms.run_generate_until(
        full, [request("generate_until", (QUESTION, gen_kwargs, to_visual, 0, "demo", "test"))],
        task_dict)
    assert answers == [vlm.tokenizer.decode(expected, skip_special_tokens=True)]


def test_max_new_tokens_and_stop_strings_are_honoured(vlm, full, image):
    tokens = full.generate_tokens(image, QUESTION, GenerationSettings(NEW_TOKENS))
    assert len(tokens) == NEW_TOKENS  # the random tiny model does not emit EOS this early
    assert full.generate_tokens(image, QUESTION, GenerationSettings(3)) == tokens[:3]

    text = vlm.tokenizer.decode(tokens, skip_special_tokens=True)
    # A stop string that first appears early: the first ASCII letter or digit after 0.
    at = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum()
              and text.index(ch) == i)
    stop = text[at]
    stopped = full.generate_tokens(image, QUESTION, GenerationSettings(NEW_TOKENS, (stop,)))
    assert len(stopped) < NEW_TOKENS and stopped == tokens[:len(stopped)]
    settings = settings_from_gen_kwargs({"until": ["never-seen", stop],
                                         "max_new_tokens": NEW_TOKENS})
    assert full.generate(image, QUESTION, settings) == text[:at]
    unstopped = settings_from_gen_kwargs({"until": "never-seen", "max_new_tokens": NEW_TOKENS})
    assert full.generate(image, QUESTION, unstopped) == text


def test_gen_kwargs_are_read_like_lmms_eval_tasks():
    assert settings_from_gen_kwargs({}) == GenerationSettings(1024, ())
    assert settings_from_gen_kwargs({"until": ["ASSISTANT:"], "max_new_tokens": 16,
                                     "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                     "do_sample": False}) == GenerationSettings(16,
                                                                                ("ASSISTANT:",))
    for bad in ({"temperature": 0.2}, {"do_sample": True}, {"num_beams": 3}, {"until": 5},
                {"until": [""]}, {"max_new_tokens": -1}, {"max_new_tokens": 0}):
        with pytest.raises(InvalidInputError):
            settings_from_gen_kwargs(bad)
    assert cut_at_stop("a. b\nASSISTANT: c", ["\n", "ASSISTANT:"]) == "a. b"


def test_requests_without_exactly_one_image_are_refused(full, image):
    task_dict, to_visual = docs([], [image, image], ["not an image"])
    for doc_id, pattern in ((0, "exactly one image, got 0"), (1, "exactly one image, got 2"),
                            (2, "must be a PIL image")):
        args = (QUESTION, {"max_new_tokens": 2}, to_visual, doc_id, "demo", "test")
        with pytest.raises(InvalidInputError, match=pattern):
            lmms.run_generate_until(full, [request("generate_until", args, doc_id)], task_dict)


def test_image_placeholders_in_the_context_are_not_doubled(full, image):
    settings = GenerationSettings(4)
    assert full.prompt("<image>\n" + QUESTION) == full.prompt(QUESTION)
    assert full.generate_tokens(image, "<image>\n" + QUESTION, settings) == \
        full.generate_tokens(image, QUESTION, settings)


def test_loglikelihood_equals_stock_loss_and_spots_the_greedy_answer(vlm, full,
                                                                     stock_processor, image):
    greedy = full.generate_tokens(image, QUESTION, GenerationSettings(4))
    loss, is_greedy = full.continuation_loss(image, QUESTION, greedy)
    assert is_greedy

    continuation = " The car is red."
    ids = full.continuation_ids(QUESTION, continuation)
    prompt = full.prompt(QUESTION)
    inputs = stock_processor(images=image, text=prompt + continuation, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :-len(ids)] = -100
    assert inputs["input_ids"][0, -len(ids):].tolist() == ids
    with torch.inference_mode():
        stock_loss = float(vlm.model(**inputs, labels=labels).loss)

    task_dict, to_visual = docs([image])
    results = lmms.run_loglikelihood(full, [
        request("loglikelihood", (QUESTION, continuation, to_visual, 0, "demo", "test")),
        request("loglikelihood", (QUESTION, lambda d: continuation, to_visual, 0, "demo",
                                  "test"))], task_dict)
    assert results[0] == results[1]
    assert results[0][0] == pytest.approx(stock_loss, abs=1e-4)
    assert results[0][1] is False and results[0][0] > loss


def test_multi_round_feeds_each_answer_back_until_the_task_ends(vlm, full, image):
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((list(previous_output), round_idx, previous_round_info))
        follow_up = f"Round {round_idx}: are you sure?"
        return doc["visuals"], follow_up, round_idx == 2, previous_output, {"round": round_idx}

    task_dict, to_visual = docs([image])
    args = (QUESTION, {"max_new_tokens": 3}, to_visual, doc_to_text, 0, "demo", "test")
    [answers] = lmms.run_multi_round(full, [request("generate_until_multi_round", args)],
                                     task_dict)
    first = full.generate(image, QUESTION, GenerationSettings(3))
    second = full.generate(image, "Round 1: are you sure?", GenerationSettings(3))
    assert answers == [first, second]
    assert seen == [([first], 1, None), ([first, second], 2, {"round": 1})]


def test_model_args_map_onto_the_config(tiny_dir):
    config = lmms.config_from_model_args(
        pretrained="llava-hf/llava-v1.6-vicuna-7b-hf", method="hero", retention=1,
        device="cuda", dtype="float16", batch_size=1, max_batch_size=None)
    assert config == AnswererConfig(model="llava-hf/llava-v1.6-vicuna-7b-hf", retention=1.0)
    # A hub id of a preset's checkpoint gets the preset's CLIP text tower; "none" drops it.
    assert spec_for(config).text_tower == "openai/clip-vit-large-patch14-336"
    assert spec_for(AnswererConfig(model="llava-hf/llava-v1.6-vicuna-7b-hf",
                                   text_tower="none")).text_tower is None
    tiny = spec_for(lmms.config_from_model_args(pretrained="tiny", models_dir=str(tiny_dir.parent),
                                                device="cpu", dtype="float32"))
    assert tiny.text_tower == str(tiny_dir / "clip") and tiny.device == "cpu"
    with pytest.raises(ConfigError, match="unknown model args ratio"):
        lmms.config_from_model_args(pretrained="tiny", ratio=0.1)
    with pytest.raises(InvalidInputError, match="retention ratio"):
        lmms.config_from_model_args(pretrained="tiny", retention=1.5)
    with pytest.raises(ConfigError, match="method must be one of"):
        lmms.config_from_model_args(pretrained="tiny", method="nope")


def test_pruned_answers_come_from_fewer_tokens(tiny_dir, image):
    config = lmms.config_from_model_args(pretrained="tiny", models_dir=str(tiny_dir.parent),
                                         device="cpu", dtype="float32", method="hero",
                                         retention=0.111, system_prompt="vicuna_v1")
    answerer = load_answerer(config)
    assert answerer.prompt("Hi?").startswith("A chat between a curious human")
    packed = answerer.prune(image, QUESTION)
    assert packed.num_tokens == round(0.111 * 576 * 3)
    task_dict, to_visual = docs([image])
    args = (QUESTION, {"max_new_tokens": 3}, to_visual, 0, "demo", "test")
    [answer] = lmms.run_generate_until(answerer, [request("generate_until", args)], task_dict)
    assert answer == answerer.generate(image, QUESTION, GenerationSettings(3))


def load_registry():
    """lmms-eval's model registry module, from its file (its package imports loguru)."""
    path = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("lmms_registry_v2",
                                                  path / "models" / "registry_v2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_lmms_eval_registry_resolves_the_model_to_this_module():
    registry_module = load_registry()
    registry = registry_module.ModelRegistryV2()
    registry.register_manifest(registry_module.ModelManifest(
        model_id=lmms.MODEL_ID, simple_class_path=lmms.CLASS_PATH))
    resolved = registry.resolve("hero_llava_next")
    module_name, class_name = resolved.class_path.rsplit(".", 1)
    assert resolved.model_type == "simple" and module_name == lmms.__name__
    assert class_name in dir(lmms)
    # Importing the module never needs lmms-eval's dependencies (loguru is not installed).
    code = f"import {module_name}, sys; print('loguru' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
