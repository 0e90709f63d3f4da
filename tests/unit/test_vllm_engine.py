"""The vLLM engine up to the vLLM call: what we hand over, and how we read what comes back.

vLLM needs a GPU and pins its own torch, so it is not installed here. In its place,
`StockGenerate` consumes exactly what vLLM would get (the `EmbedsPrompt` and the
`SamplingParams` keyword arguments) with stock transformers `generate` on the tiny
model, and answers in vLLM's delta format. What vLLM itself does with them is its
own; what is checked here is ours: the embeddings, the parameters, the mapping back.
"""

from __future__ import annotations

import asyncio
import time
import types

import pytest
import torch

from hero_core.methods import create_method
from hero_core.models import load_vlm, resolve_spec
from services.language.batching import BatchingEngine
from services.language.config import BatchingConfig, VllmConfig
from services.language.decoding import SamplingParams
from services.language.model import EngineRequest, LanguageModel
from services.language.vllm_engine import VllmEngine, engine_args, finish_reason, sampling_kwargs
from tests.unit.test_batched_engine import collect


class StockGenerate:
    """A stand-in for vLLM's `AsyncLLM`: greedy stock `generate` on the prompt embeddings,
    streamed as `RequestOutput`-shaped deltas; records what it was given."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.prompts, self.params, self.aborted = [], [], []

    async def generate(self, prompt, params, request_id):
        self.prompts.append(prompt)
        self.params.append(params)
        embeds = prompt["prompt_embeds"]
        assert embeds.ndim == 2 and embeds.device.type == "cpu"
        out = self.vlm.model.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0],
                                                                  dtype=torch.long),
            do_sample=False, max_new_tokens=params["max_tokens"],
            pad_token_id=self.vlm.tokenizer.pad_token_id)[0].tolist()
        eos = self.vlm.model.generation_config.eos_token_id
        for i, token in enumerate(out):
            at_eos = token == eos and not params["ignore_eos"]
            last = at_eos or i == len(out) - 1
            ids = [] if at_eos else [token]
            reason = ("stop" if at_eos else "length") if last else None
            completion = types.SimpleNamespace(
                text=self.vlm.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                finish_reason=reason, stop_reason=None)
            yield types.SimpleNamespace(outputs=[completion], finished=last)
            await asyncio.sleep(0)
            if last:
                return

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.fixture(scope="module")
def embeddings_model(tiny_dir):
    return LanguageModel(resolve_spec("tiny", tiny_dir.parent), parts="embeddings")


def vllm_engine(embeddings_model, vlm):
    return VllmEngine(embeddings_model, StockGenerate(vlm), dict, max_num_seqs=4)


def test_embeddings_only_model_keeps_no_decoder_layers_and_builds_the_same_prompt(
        embeddings_model, language_model, pruner, photo):
    assert len(embeddings_model.llm.layers) == 0
    assert not hasattr(embeddings_model.model, "lm_head")
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What is it?"),), SamplingParams())
    assert torch.equal(embeddings_model.prompt_embeds(request),
                       language_model.prompt_embeds(request))


def test_tokens_through_the_handed_over_embeddings_match_the_batched_engine(
        embeddings_model, language_model, vlm, pruner, photo):
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What is the astronaut holding?"),),
                            SamplingParams(16))
    engine = vllm_engine(embeddings_model, vlm)
    got = asyncio.run(collect(engine, request))
    batched = BatchingEngine(language_model, BatchingConfig())
    try:
        expected = asyncio.run(collect(batched, request))
    finally:
        batched.shutdown()
    assert got.tokens == expected.tokens
    assert got.finished.finish_reason == expected.finished.finish_reason
    assert got.finished.prompt_tokens == expected.finished.prompt_tokens
    assert got.finished.completion_tokens == len(got.tokens)
    (prompt,) = engine.llm.prompts
    hidden = language_model.text_config.hidden_size
    assert prompt["prompt_embeds"].shape == (language_model.prompt_tokens(request), hidden)
    assert prompt["prompt_embeds"].dtype == language_model.model.dtype
    assert engine.stats().running == 0


def test_sampling_parameters_and_engine_arguments_handed_to_vllm():
    params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11,
                            stop=("END",), ignore_eos=True)
    assert sampling_kwargs(params) == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                                       "seed": 11, "stop": ["END"], "ignore_eos": True,
                                       "skip_special_tokens": True}
    spec = resolve_spec("llava-v1.6-vicuna-7b", None, "cuda", "float16")
    args = engine_args(spec, VllmConfig(max_model_len=4096, max_num_seqs=128))
    assert args["model"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert args["enable_prompt_embeds"] is True
    assert args["limit_mm_per_prompt"] == {"image": 0}  # vLLM runs the text model only
    assert (args["dtype"], args["max_model_len"], args["max_num_seqs"]) == ("float16", 4096, 128)
    assert engine_args(spec, VllmConfig(llm="/models/vicuna"))["model"] == "/models/vicuna"


@pytest.mark.parametrize(("reason", "stop_reason", "ours"), [
    ("length", None, "length"), ("stop", None, "eos"), ("stop", 2, "eos"),
    ("stop", "END", "stop"), ("abort", None, "cancelled"), (None, None, "cancelled")])
def test_finish_reasons_map_to_ours(reason, stop_reason, ours):
    assert finish_reason(reason, stop_reason) == ours


def test_a_cancelled_or_expired_request_is_aborted_in_vllm(embeddings_model, vlm, pruner, photo):
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What?"),), SamplingParams(50, ignore_eos=True))
    engine = vllm_engine(embeddings_model, vlm)
    cancelled = asyncio.run(collect(engine, request, stop_after=3))
    assert len(cancelled.tokens) == 3 and len(engine.llm.aborted) == 1
    assert engine.llm.aborted[0].startswith("r-")
    expired = asyncio.run(collect(engine, request, deadline=time.monotonic() - 1))
    assert expired.finished.finish_reason == "cancelled" and expired.tokens == []
    assert len(engine.llm.aborted) == 2 and engine.stats().running == 0


def test_requests_too_long_for_vllm_are_refused_naming_the_limit(embeddings_model, vlm, pruner,
                                                                 photo):
    from hero_core.errors import InvalidInputError

    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    engine = VllmEngine(embeddings_model, StockGenerate(vlm), dict, 4, max_model_len=300)
    with pytest.raises(InvalidInputError, match="max_model_len=300"):
        engine.check(EngineRequest("r", packed, (("user", "What?"),), SamplingParams(8)), 2048)


def test_the_language_model_loads_without_the_vision_tower(tiny_dir):
    vlm = load_vlm(resolve_spec("tiny", tiny_dir.parent), parts="embeddings")
    assert not hasattr(vlm.model.model, "vision_tower")
