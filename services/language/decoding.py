"""From logits to text: sampling, end-of-sequence and stop strings, streamed deltas.

Both transformers engines (sequential and batched) finish a sequence with exactly
these rules, so their answers agree token for token and character for character.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch

FinishReason = Literal["eos", "length", "stop", "cancelled"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the sampler: the same seed (0 included) draws the same answer again; None
    draws fresh randomness for every request."""
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Generate past end-of-sequence (fixed-length answers for load tests)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest


def generator_for(params: SamplingParams) -> torch.Generator:
    """The random generator a request samples with: seeded by `params.seed`, or from
    fresh system randomness when the request has no seed."""
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> int:
    """Next token from `(V,)` logits: greedy at temperature 0, else top-p sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `(B, V)` logits, each row with its own parameters and
    generator; greedy rows take one batched argmax."""
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if p.greedy else sample(logits[i], p, generators[i])
            for i, p in enumerate(params)]


class TextStream:
    """One answer's tokens turned into text deltas.

    `add(token)` returns what can be sent now (None while the text may still begin a
    stop string or ends inside a multi-byte character); `done` says whether the
    generation is over (end of sequence, a stop string, or max_new_tokens). The
    end-of-sequence token is neither streamed nor counted (unless `ignore_eos`); the
    tokens that completed a stop string are streamed, without its text. `finish()`
    flushes what was held back, unless a stop string ended the answer.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: frozenset[int]):
        self.tokenizer, self.params, self.eos_ids = tokenizer, params, eos_ids
        self.ids: list[int] = []
        self.sent = ""
        self.pending: list[int] = []
        self.reason: FinishReason | None = None

    def add(self, token: int) -> Delta | None:
        if token in self.eos_ids and not self.params.ignore_eos:
            self.reason = "eos"
            return None
        self.ids.append(token)
        self.pending.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stops = self.params.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            # The text ends before the stop string; the tokens that made it are still
            # handed out (with no text, if need be), so every counted token is streamed.
            self.reason = "stop"
            return self._take(text, max(cut, len(self.sent)))
        if len(self.ids) >= self.params.max_new_tokens:
            self.reason = "length"
        ready = len(text) - held_back(text, stops)
        if not text.endswith("\ufffd") and ready > len(self.sent):
            return self._take(text, ready)
        return None

    def finish(self, reason: FinishReason | None = None) -> Delta | None:
        """End the answer (with `reason` when it did not end by itself) and flush."""
        if self.reason is None:
            self.reason = reason or "length"
        if self.reason == "stop":
            return None
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) or self.pending:
            return self._take(text, len(text))
        return None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _take(self, text: str, end: int) -> Delta:
        delta = Delta(text[len(self.sent):end], self.pending)
        self.sent, self.pending = text[:end], []
        return delta
