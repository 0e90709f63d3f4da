"""One benchmark request in, one answer out: prompt, prune, generate.

`Answerer` runs LLaVA-NeXT the way the serving path does (tile, encode, select with a
pruning method at a retention, pack, scatter into the prompt) and adds what
benchmark harnesses ask for: greedy generation bounded by `max_new_tokens` and cut at
stop strings, and the loss of a given continuation. `evals.lmms.lmms` wraps it
for lmms-eval; nothing here imports lmms-eval.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from hero_core.config import require
from hero_core.errors import InvalidInputError
from hero_core.generation import build_inputs_embeds, format_chat
from hero_core.image import to_rgb
from hero_core.methods import METHODS, PruningMethod, create_method
from hero_core.models import HUB_PRESETS, VLM, ModelSpec, load_vlm, resolve_spec
from hero_core.packing import PackedTokens
from hero_core.pipeline import Pruner, check_ratio

SYSTEM_PROMPTS: dict[str, str] = {
    "none": "",
    "vicuna_v1": "A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.",
}
"""Named system prompts; `vicuna_v1` is the one of LLaVA's `vicuna_v1` conversation
template, which LLaVA-NeXT-Vicuna was trained and usually evaluated with."""

DEFAULT_MAX_NEW_TOKENS = 1024
"""Token limit when a task sets none (lmms-eval's LLaVA models use the same)."""


@dataclasses.dataclass(frozen=True)
class AnswererConfig:
    """What to load and how to prune; the lmms-eval model args map onto these fields."""

    model: str = "llava-v1.6-vicuna-7b"
    """A preset of `hero_core.models` ("tiny", "llava-v1.6-vicuna-7b", ...), a local
    LLaVA-NeXT checkpoint directory or a hub id."""
    method: str = "hero"
    """Pruning method, a key of `hero_core.methods.METHODS`."""
    retention: float = 0.111
    """Visual-token retention R in (0, 1]; 0.222 / 0.111 / 0.056 keep 640 / 320 / 160
    of 2880 tokens on a 2x2 grid."""
    device: str = "cuda"
    dtype: str = "float16"
    text_tower: str | None = None
    """CLIP checkpoint for HERO's question relevance; None = the preset's (a hub id of a
    preset's checkpoint gets that preset's), "none" = relevance off."""
    models_dir: str = "models"
    """Where the `tiny` preset lives."""
    system_prompt: str = "none"
    """A key of `SYSTEM_PROMPTS`."""
    attn_implementation: str | None = None
    """"sdpa", "eager" or "flash_attention_2"; None = `ModelSpec`'s default."""

    def __post_init__(self) -> None:
        check_ratio(self.retention)
        require(self.method in METHODS,
                f"method must be one of {', '.join(sorted(METHODS))}, got {self.method!r}")
        require(self.system_prompt in SYSTEM_PROMPTS,
                f"system_prompt must be one of {', '.join(SYSTEM_PROMPTS)}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding limits of one request."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    """The answer ends before the first occurrence of any of these strings."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")


def settings_from_gen_kwargs(gen_kwargs: Mapping[str, Any]) -> GenerationSettings:
    """`GenerationSettings` from an lmms-eval task's `generation_kwargs`.

    `until` (str or list) and `max_new_tokens` are honoured; greedy settings
    (temperature 0, do_sample false, num_beams 1, any top_p) are accepted; sampling or
    beam search is refused, since answers here are greedy only. Other keys are ignored.
    """
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
        raise InvalidInputError("only greedy decoding is supported; run with "
                                "--gen_kwargs temperature=0,do_sample=False")
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise InvalidInputError("beam search is not supported; use num_beams=1")
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
        raise InvalidInputError(f"`until` must be a string or a list of strings, got {until!r}")
    limit = gen_kwargs.get("max_new_tokens")
    return GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if limit is None
                              else int(limit), stop=tuple(until))


def single_image(visuals: Sequence[Any] | None) -> Image.Image:
    """The one image of a request; `InvalidInputError` for none, several or a non-image."""
    visuals = list(visuals or [])
    if len(visuals) != 1:
        raise InvalidInputError(
            f"each request must carry exactly one image, got {len(visuals)}; HERO prunes the "
            "tiles of one image (multi-image, video and text-only tasks are not supported)")
    image = visuals[0]
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"the visual must be a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def image_digest(image: Image.Image) -> str:
    """A digest of an image's mode, size and pixels."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


class StopOnStrings(StoppingCriteria):
    """Ends generation once the decoded new tokens contain a stop string (batch of 1)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores: Any,
                 **kwargs: Any) -> torch.BoolTensor:
        # With inputs_embeds, `input_ids` holds only the generated tokens.
        text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        done = torch.full((input_ids.shape[0],), any(s in text for s in self.stop),
                          dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]


class Answerer:
    """LLaVA-NeXT answering through a pruning method at a fixed retention."""

    def __init__(self, vlm: VLM, method: PruningMethod, retention: float,
                 system_prompt: str = ""):
        self.vlm, self.method = vlm, method
        self.retention = check_ratio(retention)
        self.system_prompt = system_prompt
        self.pruner = Pruner(vlm.vision_encoder(), vlm.tiling, vlm.text_encoder)
        self.pruner.check_method(method)
        self.image_token = str(vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id))
        self._last: tuple[tuple[str, str], PackedTokens] | None = None

    def question(self, context: str) -> str:
        """The task's text without image placeholders (the image opens the user turn)."""
        return context.replace(self.image_token, "").strip() \
            if self.image_token in context else context

    def prompt(self, context: str) -> str:
        """The chat-formatted prompt, holding one image placeholder."""
        turns = [("system", self.system_prompt)] if self.system_prompt else []
        return format_chat(self.vlm.tokenizer, [*turns, ("user", self.question(context))])

    def prune(self, image: Image.Image, context: str) -> PackedTokens:
        """The image's kept tokens; the question steers question-aware methods.

        The last result is reused when the same image and question come again, as they
        do for the several continuations of a multiple-choice question.
        """
        question = self.question(context)
        key = (image_digest(image), question)
        if self._last is None or self._last[0] != key:
            result = self.pruner.prune(image, question, self.method, self.retention)
            self._last = (key, result.packed)
        return self._last[1]

    def embed(self, image: Image.Image, context: str,
              continuation_ids: Sequence[int] = ()) -> torch.Tensor:
        """LLM input embeddings `(1, T, H)` of the prompt (plus continuation tokens)."""
        tokenizer = self.vlm.tokenizer
        ids = tokenizer(self.prompt(context), return_tensors="pt").input_ids[0]
        ids = torch.cat([ids, torch.tensor(list(continuation_ids), dtype=ids.dtype)])
        return build_inputs_embeds(self.vlm.model, ids, self.prune(image, context),
                                   self.vlm.image_token_id)

    @torch.inference_mode()
    def generate_tokens(self, image: Image.Image, context: str,
                        settings: GenerationSettings) -> list[int]:
        """Greedy new token ids, at most `settings.max_new_tokens`, ended early by EOS or
        once the text holds a stop string."""
        tokenizer = self.vlm.tokenizer
        embeds = self.embed(image, context)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        stopping = StoppingCriteriaList([StopOnStrings(tokenizer, settings.stop)]) \
            if settings.stop else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        out = self.vlm.model.generate(
            inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
            stopping_criteria=stopping)
        return [int(t) for t in out[0]]

    def generate(self, image: Image.Image, context: str, settings: GenerationSettings) -> str:
        """The greedy answer text, cut before the first stop string."""
        ids = self.generate_tokens(image, context, settings)
        text = str(self.vlm.tokenizer.decode(ids, skip_special_tokens=True))
        return cut_at_stop(text, settings.stop)

    def continuation_ids(self, context: str, continuation: str) -> list[int]:
        """Token ids of `continuation` as it tokenises after the prompt."""
        tokenizer = self.vlm.tokenizer
        prompt = self.prompt(context)
        head = tokenizer(prompt).input_ids
        whole = tokenizer(prompt + continuation).input_ids
        if whole[:len(head)] == head:
            return [int(t) for t in whole[len(head):]]
        return [int(t) for t in tokenizer(continuation, add_special_tokens=False).input_ids]

    @torch.inference_mode()
    def continuation_loss(self, image: Image.Image, context: str,
                          continuation_ids: Sequence[int]) -> tuple[float, bool]:
        """Mean negative log-likelihood per continuation token, and whether greedy
        decoding would produce exactly these tokens (lmms-eval's `loglikelihood` pair)."""
        if not continuation_ids:
            raise InvalidInputError("the continuation is empty")
        embeds = self.embed(image, context, continuation_ids)
        n = len(continuation_ids)
        logits = self.vlm.model(inputs_embeds=embeds).logits[0, -n - 1:-1].float()
        target = torch.tensor(list(continuation_ids), device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target)
        return float(loss), bool((logits.argmax(-1) == target).all())


def spec_for(config: AnswererConfig) -> ModelSpec:
    """The `ModelSpec` an `AnswererConfig` names (checkpoint, CLIP text tower, device)."""
    spec = resolve_spec(config.model, Path(config.models_dir), config.device, config.dtype)
    if config.text_tower is None and spec.text_tower is None:
        preset = next((p for p in HUB_PRESETS.values() if p.model == spec.model), None)
        spec = dataclasses.replace(spec, text_tower=preset.text_tower if preset else None)
    elif config.text_tower is not None:
        tower = None if config.text_tower == "none" else config.text_tower
        spec = dataclasses.replace(spec, text_tower=tower)
    if config.attn_implementation is not None:
        spec = dataclasses.replace(spec, attn_implementation=config.attn_implementation)
    return spec


def load_answerer(config: AnswererConfig) -> Answerer:
    """Load the checkpoint `config` names and wrap it with its pruning method."""
    vlm = load_vlm(spec_for(config))
    return Answerer(vlm, create_method(config.method), config.retention,
                    SYSTEM_PROMPTS[config.system_prompt])
