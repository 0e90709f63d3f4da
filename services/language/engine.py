"""Engines run the LLM for the language service; the server never imports model classes.

`Engine` is the protocol; `TransformersEngine` implements it with a Hugging Face
LLaVA-NeXT checkpoint on CPU or GPU (`ModelSpec.device`). Generation is a plain
prefill + decode loop with a KV cache, so each step can observe cancellation and
each request samples from its own seeded generator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch

from hero_core.errors import InvalidInputError, PromptTooLongError
from hero_core.generation import build_inputs_embeds, format_chat
from hero_core.models import ModelSpec, load_vlm
from hero_core.packing import PackedTokens, check_packed
from hero_core.tiling import TilingSpec, plan_grid

FinishReason = Literal["eos", "length", "stop", "cancelled"]
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Generate past end-of-sequence (fixed-length answers for load tests)."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    packed: PackedTokens
    messages: tuple[tuple[str, str], ...]
    """(role, text) turns; the image goes with the first user turn."""
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model: str
    feature_dim: int
    tiling: TilingSpec
    max_positions: int


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclasses.dataclass
class Finished:
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int
    prefill_ms: float
    first_token_at: float
    """`time.perf_counter()` when the first token was ready."""
    decode_tokens_per_s: float
    finish_reason: FinishReason


class Engine(Protocol):
    info: EngineInfo

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        """Raise `InvalidInputError` for anything the model cannot take."""

    def generate(self, request: EngineRequest,
                 cancelled: Callable[[], bool]) -> Iterator[Delta | Finished]:
        """Run one request (blocking; called in a worker thread)."""

    def warmup(self) -> None:
        """One tiny generation, so the first real request is not slow."""


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> int:
    """Next token from `(V,)` logits: greedy at temperature 0, else top-p sampling."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TransformersEngine:
    """LLaVA-NeXT's projector, image_newline and LLM from a Hugging Face checkpoint."""

    def __init__(self, spec: ModelSpec):
        # The vision tower runs in the vision service; only the language half loads here.
        vlm = load_vlm(spec, parts="language")
        self.model, self.tokenizer = vlm.model, vlm.tokenizer
        self.image_token_id = vlm.image_token_id
        self.device = torch.device(spec.device)
        text_config = vlm.config.text_config
        self.info = EngineInfo(spec.model, vlm.feature_dim, vlm.tiling,
                               int(getattr(text_config, "max_position_embeddings", 4096)))
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def prompt_ids(self, request: EngineRequest) -> torch.Tensor:
        return self.tokenizer(format_chat(self.tokenizer, request.messages),
                              return_tensors="pt").input_ids[0]

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        for role, text in request.messages:
            if role not in ROLES:
                raise InvalidInputError(f"chat role {role!r} is not one of {', '.join(ROLES)}")
            if "<image>" in text:
                raise InvalidInputError("text must not contain '<image>'; the server places "
                                        "the image itself")
        if not request.messages or request.messages[-1][0] != "user":
            raise InvalidInputError("the conversation must end with a user turn")
        if not any(text.strip() for role, text in request.messages if role == "user"):
            raise InvalidInputError("the prompt is empty; ask a question")
        grid = plan_grid(request.packed.image_size, self.info.tiling)
        check_packed(request.packed, grid, self.info.feature_dim)
        n_prompt = int(self.prompt_ids(request).numel()) - 1
        if n_prompt > max_prompt_tokens:
            raise PromptTooLongError(f"prompt is {n_prompt} tokens, above max_prompt_tokens="
                                     f"{max_prompt_tokens}; shorten it")
        total = n_prompt + request.packed.num_embeddings + request.params.max_new_tokens
        if total > self.info.max_positions:
            raise InvalidInputError(f"prompt + visual tokens + max_new_tokens = {total} exceeds "
                                    f"the model's {self.info.max_positions} positions; lower "
                                    "max_new_tokens or the retention")

    @torch.inference_mode()
    def generate(self, request: EngineRequest,
                 cancelled: Callable[[], bool]) -> Iterator[Delta | Finished]:
        params = request.params
        input_ids = self.prompt_ids(request)
        embeds = build_inputs_embeds(self.model, input_ids, request.packed, self.image_token_id)
        generator = torch.Generator().manual_seed(params.seed)
        start = time.perf_counter()
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - start) * 1e3
        first_at, sent = 0.0, ""
        reason: FinishReason = "length"
        ids: list[int] = []
        pending: list[int] = []
        for step in range(params.max_new_tokens):
            token = sample(out.logits[0, -1], params, generator)
            if step == 0:
                first_at = time.perf_counter()
            if token in self.eos_ids and not params.ignore_eos:
                reason = "eos"
                break
            ids.append(token)
            pending.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                reason = "stop"
                if cut > len(sent):
                    yield Delta(text[len(sent):cut], pending)
                break
            ready = len(text) - held_back(text, params.stop)
            if not text.endswith("\ufffd") and ready > len(sent):
                yield Delta(text[len(sent):ready], pending)
                sent, pending = text[:ready], []
            if cancelled():
                reason = "cancelled"
                break
            if step + 1 < params.max_new_tokens:
                next_ids = torch.tensor([[token]], device=self.device)
                out = self.model(input_ids=next_ids, past_key_values=out.past_key_values,
                                 use_cache=True)
        if reason != "stop":  # flush text held back for a possible stop string
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent) or pending:
                yield Delta(text[len(sent):], pending)
        decode_s = time.perf_counter() - first_at if first_at else 0.0
        tps = (len(ids) - 1) / decode_s if len(ids) > 1 and decode_s > 0 else 0.0
        yield Finished(int(input_ids.numel()) - 1 + request.packed.num_embeddings,
                       request.packed.num_embeddings, len(ids), prefill_ms, first_at, tps,
                       reason)

    def warmup(self) -> None:
        side = self.info.tiling.side
        grid = plan_grid((self.info.tiling.crop_size,) * 2, self.info.tiling)
        valid = grid.valid_mask()
        first_tile = int(torch.nonzero(valid[1])[0])
        packed = PackedTokens(
            features=torch.zeros(2, self.info.feature_dim),
            crop=torch.tensor([0, 1], dtype=torch.int16),
            row=torch.tensor([0, first_tile // side], dtype=torch.int16),
            col=torch.tensor([0, first_tile % side], dtype=torch.int16),
            newline_after=torch.tensor([False, True]), image_size=grid.image_size,
            grid=(grid.rows, grid.cols), side=side, full_tokens=grid.full_token_count)
        request = EngineRequest("warmup", packed, (("user", "hi"),), SamplingParams(2))
        for _ in self.generate(request, lambda: False):
            pass


def engine_from_spec(spec: ModelSpec) -> Any:
    """The engine for a model spec (one implementation today)."""
    return TransformersEngine(spec)
