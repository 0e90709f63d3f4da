"""The language half of a LLaVA-NeXT checkpoint and the requests it takes.

`LanguageModel` holds what every engine needs: the tokenizer, the projector and
`image_newline`, the LLM's embedding table, and (for the transformers engines) the
LLM itself. It checks a request against the model and turns it into prompt
embeddings exactly as stock LLaVA-NeXT does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hero_core.errors import InvalidInputError, PromptTooLongError
from hero_core.generation import build_inputs_embeds, format_chat
from hero_core.models import ModelSpec, load_vlm
from hero_core.packing import PackedTokens, check_packed
from hero_core.tiling import TilingSpec, plan_grid
from services.language.decoding import SamplingParams
from services.language.engine import EngineInfo, EngineRequest, kv_tokens

__all__ = ["EngineInfo", "EngineRequest", "KVShape", "LanguageModel", "check_finite",
           "smallest_packed"]

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class KVShape:
    """What one token of KV cache holds: keys and values of every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * item


class LanguageModel:
    """Tokenizer, projector, image_newline and LLM of a LLaVA-NeXT checkpoint."""

    def __init__(self, spec: ModelSpec, parts: str = "language"):
        # The vision tower runs in the vision service; only the language half loads here.
        vlm = load_vlm(spec, parts=parts)
        self.model, self.tokenizer = vlm.model, vlm.tokenizer
        self.image_token_id = vlm.image_token_id
        self.device = torch.device(spec.device)
        text_config = vlm.config.text_config
        self.text_config = text_config
        self.info = EngineInfo(spec.model, vlm.feature_dim, vlm.tiling,
                               int(getattr(text_config, "max_position_embeddings", 4096)))
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos]) - {None}

    @property
    def llm(self) -> Any:
        """The decoder stack (`LlamaModel`, `MistralModel`, ...) without its head."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> Any:
        return self.model.lm_head

    def kv_shape(self) -> KVShape:
        c = self.text_config
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        return KVShape(int(c.num_hidden_layers), int(getattr(c, "num_key_value_heads", heads)),
                       head_dim, self.model.dtype)

    def prompt_ids(self, request: EngineRequest) -> torch.Tensor:
        """Token ids `(T,)` of the chat-formatted prompt, with one image placeholder (kept
        on a checked request; tokenized otherwise).

        The placeholder opens the first user turn, before its text (`format_chat`), so
        every question about the same kept tokens has the same prompt up to the image's
        end: the prefix the batched engine's KV cache reuses."""
        if request.prompt_ids is not None:
            return request.prompt_ids
        ids: torch.Tensor = self.tokenizer(format_chat(self.tokenizer, request.messages),
                                           return_tensors="pt").input_ids[0]
        return ids

    def prompt_tokens(self, request: EngineRequest) -> int:
        """Length of the LLM's input: text tokens plus visual embeddings."""
        return int(self.prompt_ids(request).numel()) - 1 + request.packed.num_embeddings

    @torch.inference_mode()
    def prompt_embeds(self, request: EngineRequest) -> torch.Tensor:
        """The LLM's input embeddings `(T', H)`: text embeddings with the projected visual
        tokens and `image_newline` rows in place of the image placeholder."""
        ids = self.prompt_ids(request)
        return build_inputs_embeds(self.model, ids, request.packed, self.image_token_id)[0]

    @torch.inference_mode()
    def token_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings `(T, H)` of token ids `(T,)` (generated tokens fed
        back as input, as the decoder embeds them)."""
        embeds: torch.Tensor = self.model.get_input_embeddings()(ids)
        return embeds

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        """Raise `InvalidInputError` for anything the model cannot take; else return the
        request with its prompt's token ids (its KV need: `needs`)."""
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
        check_finite(request.packed.features)
        request = dataclasses.replace(request, prompt_ids=self.prompt_ids(request))
        n_prompt = int(self.prompt_ids(request).numel()) - 1
        if n_prompt > max_prompt_tokens:
            raise PromptTooLongError(f"prompt is {n_prompt} tokens, above max_prompt_tokens="
                                     f"{max_prompt_tokens}; shorten it")
        total = self.needs(request)
        if total > self.info.max_positions:
            raise InvalidInputError(f"prompt + visual tokens + max_new_tokens = {total} exceeds "
                                    f"the model's {self.info.max_positions} positions; lower "
                                    "max_new_tokens or the retention")
        return request

    def needs(self, request: EngineRequest) -> int:
        """The request's length in KV tokens (prompt + visual + max_new_tokens)."""
        return kv_tokens(self.prompt_tokens(request), request.params.max_new_tokens)

    def warmup_request(self) -> EngineRequest:
        """A two-token request on the smallest valid layout."""
        packed = smallest_packed(self.info.tiling, self.info.feature_dim)
        return EngineRequest("warmup", packed, (("user", "hi"),), SamplingParams(2))


def check_finite(features: torch.Tensor) -> None:
    """Raise `InvalidInputError` if `(N, D)` visual features hold a NaN or an infinity
    (they would make every score of the request's answer NaN)."""
    bad = ~torch.isfinite(features)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.any(dim=1))[0])
        raise InvalidInputError(f"visual features must be finite numbers; token {first} of "
                                f"{features.shape[0]} holds NaN or infinity")


def smallest_packed(tiling: TilingSpec, feature_dim: int) -> PackedTokens:
    """The smallest valid layout: one thumbnail and one tile token of a square image. It
    stands in for the image when only a request's text is checked (`Validate`)."""
    grid = plan_grid((tiling.crop_size,) * 2, tiling)
    first_tile = int(torch.nonzero(grid.valid_mask()[1])[0])
    return PackedTokens(
        features=torch.zeros(2, feature_dim), crop=torch.tensor([0, 1], dtype=torch.int16),
        row=torch.tensor([0, first_tile // tiling.side], dtype=torch.int16),
        col=torch.tensor([0, first_tile % tiling.side], dtype=torch.int16),
        newline_after=torch.tensor([False, True]), image_size=grid.image_size,
        grid=(grid.rows, grid.cols), side=tiling.side, full_tokens=grid.full_token_count)
