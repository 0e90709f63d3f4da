"""Prompt construction and in-process generation from packed tokens.

The language service runs exactly this: the prompt's single image placeholder is
expanded to the packed sequence's length and the projected tokens are scattered
into the prompt's embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hero_core.packing import PackedTokens, embed_packed, expand_image_token, merge_with_prompt


def format_prompt(tokenizer: Any, question: str) -> str:
    """The chat-formatted prompt for one image and one question."""
    return format_chat(tokenizer, [("user", question)])


def format_chat(tokenizer: Any, turns: Sequence[tuple[str, str]]) -> str:
    """The chat-formatted prompt for (role, text) turns; the image opens the first user
    turn. Uses the checkpoint's chat template, else a Vicuna-style layout."""
    if getattr(tokenizer, "chat_template", None):
        messages, placed = [], False
        for role, text in turns:
            content: list[dict[str, str]] = [{"type": "text", "text": text}]
            if role == "user" and not placed:
                content.insert(0, {"type": "image"})
                placed = True
            messages.append({"role": role, "content": content})
        return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True))
    parts, placed = [], False
    for role, text in turns:
        if role == "user" and not placed:
            text, placed = "<image>\n" + text, True
        parts.append(f"{role.upper()}: {text}" if role != "system" else text)
    return " ".join(parts) + " ASSISTANT:"


def build_inputs_embeds(model: Any, input_ids: torch.Tensor, packed: PackedTokens,
                        image_token_id: int) -> torch.Tensor:
    """Input embeddings `(1, T', H)` for prompt ids `(T,)` with one image placeholder."""
    inner = model.model
    image = embed_packed(packed, inner.multi_modal_projector, inner.image_newline)
    ids = expand_image_token(input_ids, image_token_id, image.shape[0])[None]
    return merge_with_prompt(ids.to(image.device), image, model.get_input_embeddings(),
                             image_token_id)


@torch.inference_mode()
def generate_greedy(model: Any, tokenizer: Any, packed: PackedTokens, prompt: str,
                    image_token_id: int, max_new_tokens: int) -> list[int]:
    """Greedy token ids generated for `prompt` (holding `<image>`) and packed tokens."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    embeds = build_inputs_embeds(model, input_ids, packed, image_token_id)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return [int(t) for t in out[0]]
