"""The vLLM engine up to the vLLM call: what we hand over, and how we read what comes back.

vLLM needs a GPU and pins CUDA builds of torch, so it is not installed here. In its
place `StandInLLM` (tests/unit/vllm_standin.py) takes exactly what vLLM would get (the
`EmbedsPrompt` and the `SamplingParams` keyword arguments), decodes greedily with the
tiny model, and streams vLLM 0.30.0's output classes as vLLM fills them. What vLLM
itself does with the embeddings is its own; what is checked here is ours: the
embeddings, the parameters, the mapping back (the contract shared with the other
engines is tests/unit/test_engine_contract.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
import time

import pytest
import torch

from hero_core.methods import create_method
from hero_core.models import load_vlm, resolve_spec
from loadtest.micro.prefix_share import common_prefix
from services.language.config import VllmConfig
from services.language.decoding import SamplingParams
from services.language.model import EngineRequest
from services.language.vllm_engine import VllmEngine, engine_args, finish_reason, sampling_kwargs
from tests.conftest import noise_image
from tests.unit.test_batched_engine import collect
from tests.unit.vllm_standin import StandInLLM


def vllm_engine(embeddings_model, language_model, **kwargs):
    llm = StandInLLM(language_model.model, language_model.tokenizer,
                     language_model.tokenizer.eos_token_id)
    return VllmEngine(embeddings_model, llm, dict, max_num_seqs=4, **kwargs)


def test_embeddings_only_model_keeps_no_decoder_layers_and_builds_the_same_prompt(
        embeddings_model, language_model, pruner, photo):
    assert len(embeddings_model.llm.layers) == 0
    assert not hasattr(embeddings_model.model, "lm_head")
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What is it?"),), SamplingParams())
    assert torch.equal(embeddings_model.prompt_embeds(request),
                       language_model.prompt_embeds(request))


def test_the_prompt_handed_over_is_the_embeddings_in_the_model_dtype_on_the_cpu(
        embeddings_model, language_model, pruner, photo):
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What is the astronaut holding?"),),
                            SamplingParams(16))
    engine = vllm_engine(embeddings_model, language_model)
    answer = asyncio.run(collect(engine, request))
    assert answer.finished.finish_reason == "length" and len(answer.tokens) == 16
    (prompt,) = engine.llm.prompts
    hidden = language_model.text_config.hidden_size
    assert prompt["prompt_embeds"].shape == (language_model.prompt_tokens(request), hidden)
    assert prompt["prompt_embeds"].dtype == language_model.model.dtype
    assert prompt["prompt_embeds"].device.type == "cpu"
    assert torch.equal(prompt["prompt_embeds"], language_model.prompt_embeds(request))
    assert engine.stats().running == 0


class SlowPrompt:
    """The embeddings model, whose prompts take 0.3 s to build; notes the threads."""

    def __init__(self, model):
        self.model, self.threads = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def prompt_embeds(self, request):
        self.threads.append(threading.get_ident())
        time.sleep(0.3)
        return self.model.prompt_embeds(request)


def test_the_prompt_is_built_off_the_event_loop(embeddings_model, language_model, pruner,
                                                photo):
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    request = EngineRequest("r", packed, (("user", "What?"),), SamplingParams(4))
    slow = SlowPrompt(embeddings_model)
    engine = VllmEngine(slow, vllm_engine(embeddings_model, language_model).llm, dict, 4)

    async def scenario():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        ticker = asyncio.create_task(tick())
        answer = await collect(engine, request)
        ticker.cancel()
        return answer, ticks, threading.get_ident()

    answer, ticks, loop_thread = asyncio.run(scenario())
    assert len(answer.tokens) == 4
    assert slow.threads and loop_thread not in slow.threads
    assert ticks >= 10  # the loop went on with other work while the prompt was built


def test_sampling_parameters_and_engine_arguments_handed_to_vllm():
    params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11,
                            stop=("END",), ignore_eos=True)
    assert sampling_kwargs(params) == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                                       "seed": 11, "stop": ["END"], "ignore_eos": True,
                                       "skip_special_tokens": True}
    # no seed stays no seed (vLLM then samples unseeded); seed 0 is a seed
    assert sampling_kwargs(SamplingParams())["seed"] is None
    assert sampling_kwargs(SamplingParams(seed=0))["seed"] == 0
    spec = resolve_spec("llava-v1.6-vicuna-7b", None, "cuda", "float16")
    args = engine_args(spec, VllmConfig(max_model_len=4096, max_num_seqs=128))
    assert args["model"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert args["enable_prompt_embeds"] is True
    assert args["limit_mm_per_prompt"] == {"image": 0}  # vLLM runs the text model only
    assert (args["dtype"], args["max_model_len"], args["max_num_seqs"]) == ("float16", 4096, 128)
    assert engine_args(spec, VllmConfig(llm="/models/vicuna"))["model"] == "/models/vicuna"
    assert args["enable_prefix_caching"] is True  # reuse, as the batched engine does
    assert engine_args(spec, VllmConfig(prefix_caching=False))["enable_prefix_caching"] is False


@pytest.mark.parametrize(("reason", "stop_reason", "ours"), [
    ("length", None, "length"), ("stop", None, "eos"), ("stop", 2, "eos"),
    ("stop", "END", "stop"), ("abort", None, "cancelled"), (None, None, "cancelled")])
def test_finish_reasons_map_to_ours(reason, stop_reason, ours):
    assert finish_reason(reason, stop_reason) == ours


def test_a_request_without_a_seed_reaches_vllm_without_one(embeddings_model, language_model,
                                                            pruner, photo):
    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    engine = vllm_engine(embeddings_model, language_model)
    for seed in (None, 0):
        request = EngineRequest("r", packed, (("user", "What?"),), SamplingParams(2, seed=seed))
        asyncio.run(collect(engine, request))
    assert [p["seed"] for p in engine.llm.params] == [None, 0]


def test_requests_too_long_for_vllm_are_refused_naming_the_limit(embeddings_model,
                                                                 language_model, pruner, photo):
    from hero_core.errors import InvalidInputError

    packed = pruner.prune(photo, "What?", create_method("hero"), 0.111).packed
    engine = vllm_engine(embeddings_model, language_model, max_model_len=300)
    with pytest.raises(InvalidInputError, match="max_model_len=300"):
        engine.check(EngineRequest("r", packed, (("user", "What?"),), SamplingParams(8)), 2048)


def test_the_language_model_loads_without_the_vision_tower(tiny_dir):
    vlm = load_vlm(resolve_spec("tiny", tiny_dir.parent), parts="embeddings")
    assert not hasattr(vlm.model.model, "vision_tower")


def block_keys(embeds: torch.Tensor, block_size: int = 16) -> list[bytes]:
    """Keys of the full blocks of prompt embeddings as vLLM's prefix cache forms them:
    each block's rows hashed by their bytes (SHA-256), chained over the blocks before."""
    keys, parent = [], b""
    for start in range(0, embeds.shape[0] - block_size + 1, block_size):
        rows = embeds[start:start + block_size].contiguous().view(torch.uint8)
        parent = hashlib.sha256(parent + hashlib.sha256(rows.numpy().tobytes()).digest()
                                ).digest()
        keys.append(parent)
    return keys


def test_identical_requests_hand_vllm_bit_identical_embeddings(embeddings_model,
                                                               language_model, pruner, photo):
    """vLLM reuses a prompt-embeds block only when its bytes match: the same request built
    twice, and once while a different request is built and run beside it, gives
    `torch.equal` embeddings; a later turn about the same kept tokens gives the first
    turn's rows up to where their text differs, so vLLM finds every block of the image."""
    hero = create_method("hero")
    packed = pruner.prune(photo, "What is held?", hero, 0.111).packed
    other = pruner.prune(noise_image(300, 600, 5), "What?", hero, 0.2).packed
    ask = EngineRequest("ask", packed, (("user", "What is the astronaut holding?"),),
                        SamplingParams(3))
    beside = EngineRequest("beside", other, (("user", "Describe it."),), SamplingParams(3))
    later = dataclasses.replace(ask, request_id="later", messages=(
        *ask.messages, ("assistant", "A flag."), ("user", "What colour is it?")))
    engine = vllm_engine(embeddings_model, language_model)
    alone = engine.prompt(ask)["prompt_embeds"]
    assert torch.equal(engine.prompt(ask)["prompt_embeds"], alone)

    async def together():
        return await asyncio.gather(collect(engine, ask), collect(engine, beside),
                                    collect(engine, later))
    asyncio.run(together())
    handed = {len(p["prompt_embeds"]): p["prompt_embeds"] for p in engine.llm.prompts}
    assert len(handed) == 3
    assert torch.equal(handed[alone.shape[0]], alone)
    assert alone.dtype == language_model.model.dtype
    followed = handed[language_model.prompt_tokens(later)]
    image_end = int((language_model.prompt_ids(ask) == language_model.image_token_id
                     ).nonzero()[0]) + packed.num_embeddings
    assert torch.equal(followed[:image_end], alone[:image_end])
    first, then = block_keys(alone), block_keys(followed)
    same_upto = common_prefix(first, then)
    assert same_upto >= image_end // 16 and same_upto > 0
    assert block_keys(handed[language_model.prompt_tokens(beside)])[0] != first[0]
