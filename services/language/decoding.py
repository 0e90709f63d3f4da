"""From logits to text: sampling, end-of-sequence and stop strings, streamed deltas.

Both transformers engines (sequential and batched) finish a sequence with exactly
these rules, so their answers agree token for token and character for character.

Sampling is defined for every parameter value the service accepts: scores are shifted
so the largest is 0 before they are divided by the temperature, in float64, so a
temperature too small to divide by (down to the smallest subnormal) gives the other
tokens probability 0 and picks the top token, as greedy does, instead of overflowing
to NaN. A row whose logits are NaN or infinite gives no token: it gets a
`NonFiniteLogitsError` of its own, and in a batch the other rows are sampled as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch

from hero_core.errors import InvalidInputError

FinishReason = Literal["eos", "length", "stop", "cancelled"]


class NonFiniteLogitsError(InvalidInputError):
    """The model's next-token scores for one request are NaN or infinite, so no token
    can be chosen. With finite visual features (the service refuses others) this takes
    features far outside the range the projector and the LLM compute in; retrying the
    same request gives the same result."""

    def __init__(self, tokens: int):
        super().__init__(
            f"the model's next-token scores for this request became NaN or infinite after "
            f"{tokens} generated token(s), so no token can be chosen; its visual features "
            "are probably far outside the vision encoder's range")


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


def unusable(logits: torch.Tensor) -> torch.Tensor:
    """`(B,)` True for each row of `(B, V)` logits that can give no token: one with a NaN
    or +inf, or with every score -inf (its maximum is then not finite)."""
    return ~torch.isfinite(logits.amax(dim=-1))


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64 `(V,)` probabilities of finite `(V,)` logits (CPU): softmax at
    `temperature` > 0, then top-p; never NaN, and never without the top token."""
    scores = logits.detach().to("cpu", torch.float64)
    # <= 0 everywhere and exactly 0 at the top, so dividing by any positive temperature
    # can only push the others towards -inf (probability 0), never produce inf - inf
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > top_p
        outside[0] = False  # the most likely token stays, whatever top_p is
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs / sorted_probs.sum())
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           generated: int = 0) -> int:
    """Next token from `(V,)` logits: greedy at temperature 0, else top-p sampling.
    `NonFiniteLogitsError` (naming `generated`, the tokens so far) if the logits give none."""
    if bool(unusable(logits[None])[0]):
        raise NonFiniteLogitsError(generated)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = probabilities(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator],
                generated: Sequence[int] | None = None) -> list[int | Exception]:
    """One token per row of `(B, V)` logits, each row with its own parameters and
    generator (`generated`: tokens each row has so far); greedy rows take one batched
    argmax. A row that gives no token (NaN or infinite logits, or any error while it is
    sampled) gets its exception in its place: it fails alone, the others go on."""
    greedy = logits.argmax(dim=-1).tolist()
    bad = unusable(logits).tolist()
    generated = generated or [0] * len(params)
    out: list[int | Exception] = []
    for i, p in enumerate(params):
        if bad[i]:
            out.append(NonFiniteLogitsError(generated[i]))
        elif p.greedy:
            out.append(greedy[i])
        else:
            try:
                out.append(sample(logits[i], p, generators[i], generated[i]))
            except Exception as exc:  # this row's own failure, reported for this row
                out.append(exc)
    return out


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
