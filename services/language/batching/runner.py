"""The model step: a prompt chunk, or one decode token for many sequences, as one
forward of the stock transformers decoder over the KV pool.

It knows positions and KV slots, nothing about requests: rows are left-padded to a
common width, each row carries its own `position_ids`, and a 2-D attention mask hides
the padding (transformers combines it with the causal mask).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from services.language.batching.kv import KVPool, PooledCache, StepLayout
from services.language.model import LanguageModel


class ModelRunner:
    def __init__(self, model: LanguageModel, pool: KVPool):
        self.model, self.pool = model, pool
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, slots: torch.Tensor, start: int,
                last: bool) -> torch.Tensor | None:
        """Write prompt positions `[start, start + len(embeds))` of one sequence.

        embeds: `(q, H)` prompt embeddings of the chunk; slots: `(>= start + q,)` the
        sequence's KV slots. Returns the `(V,)` logits after the chunk when `last`.
        """
        q = embeds.shape[0]
        end = start + q
        step = StepLayout(1, q, end, slots[start:end], None if start == 0 else read(slots, end))
        positions = torch.arange(start, end, device=self.device)[None]
        hidden = self.model.llm(inputs_embeds=embeds[None], position_ids=positions,
                                past_key_values=PooledCache(self.pool, step),
                                use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[0, -1]) if last else None

    @torch.inference_mode()
    def decode(self, tokens: Seq[int], cached: Seq[int],
               slots: Seq[torch.Tensor]) -> torch.Tensor:
        """One token for each of B sequences; logits `(B, V)`.

        tokens: the token each row feeds in; cached: tokens each row has in the KV
        cache (the new token goes at that position); slots: each row's KV slots.
        """
        batch = len(tokens)
        width = max(cached) + 1
        write = torch.stack([s[n] for s, n in zip(slots, cached, strict=True)])
        gather: torch.Tensor | slice
        if batch == 1:
            gather = read(slots[0], width)
        else:
            gather = torch.full((batch, width), self.pool.pad_slot, dtype=torch.long,
                                device=self.device)
            for row, (s, n) in enumerate(zip(slots, cached, strict=True)):
                gather[row, width - n - 1:] = s[:n + 1]
            gather = gather.flatten()
        mask = None
        if min(cached) + 1 < width:  # some rows are padded on the left
            columns = torch.arange(width, device=self.device)
            starts = width - 1 - torch.tensor(cached, device=self.device)
            mask = columns[None] >= starts[:, None]
        step = StepLayout(batch, 1, width, write, gather)
        hidden = self.model.llm(
            input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
            position_ids=torch.tensor(cached, device=self.device)[:, None],
            past_key_values=PooledCache(self.pool, step), use_cache=True).last_hidden_state
        logits: torch.Tensor = self.model.lm_head(hidden[:, -1])
        return logits


def read(slots: torch.Tensor, length: int) -> torch.Tensor | slice:
    """Where one sequence's first `length` tokens are: a slice when the slots are
    consecutive (they usually are: the pool hands out the lowest free ones)."""
    first = int(slots[0])
    return slice(first, first + length) if int(slots[length - 1]) - first == length - 1 \
        else slots[:length]
