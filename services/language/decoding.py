"""From logits to text: sampling, end-of-sequence and stop strings, streamed deltas.

Both transformers engines (sequential and batched) finish a sequence with exactly
these rules, so their answers agree token for token and character for character.

Sampling is defined for every parameter value the service accepts: scores are shifted
so the largest is 0 before they are divided by the temperature, in float64, so a
temperature too small to divide by (down to the smallest subnormal) gives the other
tokens probability 0 and picks the top token, as greedy does, instead of overflowing
to NaN. A row whose logits are NaN or infinite gives no token: it gets a
`NonFiniteLogitsError` of its own, and in a batch the other rows are sampled as usual.
A batch is sampled in one pass whatever its rows' parameters (`sample_rows`), and every
row gets exactly the token it would get alone.
"""

from __future__ import annotations

import dataclasses
import math
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


class SamplingError(RuntimeError):
    """A row's sampling distribution is not a distribution (a NaN temperature or top_p
    reached the sampler): that row gives no token."""


def _sorted_distribution(logits: torch.Tensor, temperature: torch.Tensor,
                         top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised float64 probabilities `(B, V)` in descending order, and the vocabulary
    index of each column, for `(B, V)` logits at per-row temperatures and top-p `(B,)`
    (float64, on the logits' device; top_p >= 1 keeps everything)."""
    scores = logits.detach().to(torch.float64)
    # <= 0 everywhere and exactly 0 at the top, so dividing by any positive temperature
    # can only push the others towards -inf (probability 0), never produce inf - inf
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature[:, None]
    # ordered by the scores, not the probabilities: logits closer than softmax resolves
    # get equal probabilities, and the top one must still come first
    scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    probs = torch.softmax(scores, dim=-1)
    outside = torch.cumsum(probs, dim=-1) - probs > top_p[:, None]
    outside[:, 0] = False  # the most likely token stays, whatever top_p is
    return probs.masked_fill(outside, 0.0), order


def _row_parameters(params: Sequence[SamplingParams],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64)
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params],
                         dtype=torch.float64)
    return temperature.to(device), top_p.to(device)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64 `(V,)` probabilities of finite `(V,)` logits (CPU): softmax at
    `temperature` > 0, then top-p; never NaN, and never without the top token."""
    params = [SamplingParams(temperature=temperature, top_p=top_p)]
    probs, order = _sorted_distribution(logits[None].cpu(), *_row_parameters(params,
                                                                             torch.device("cpu")))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)[0]


def _draw(logits: torch.Tensor, params: Sequence[SamplingParams],
          generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled token per row of `(S, V)` logits and whether the row's distribution was
    valid, both `(S,)` on the logits' device, with no host synchronisation: each row takes
    one uniform draw from its own generator (on the host, where generators live) and
    inverts the cumulative distribution of its top-p set."""
    temperature, top_p = _row_parameters(params, logits.device)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    probs, order = _sorted_distribution(logits, temperature, top_p)
    cumulative = torch.cumsum(probs, dim=-1)
    total = cumulative[:, -1:]
    valid = (torch.isfinite(total) & (total > 0)).squeeze(1)
    target = uniform.to(logits.device)[:, None] * total.nan_to_num(0.0)
    column = torch.searchsorted(cumulative.nan_to_num(0.0), target, right=True)
    column = column.clamp_(max=probs.shape[-1] - 1)
    return order.gather(1, column).squeeze(1), valid


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           generated: int = 0) -> int:
    """Next token from `(V,)` logits: greedy at temperature 0, else top-p sampling.
    `NonFiniteLogitsError` (naming `generated`, the tokens so far) if the logits give none."""
    (outcome,) = sample_rows(logits[None], [params], [generator], [generated])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator],
                generated: Sequence[int] | None = None) -> list[int | Exception]:
    """One token per row of `(B, V)` logits, each row with its own parameters and
    generator (`generated`: tokens each row has so far). Greedy rows take one batched
    argmax, sampled rows one batched draw (`_draw`); the tokens and the rows' failures
    reach the host in one transfer. A row that gives no token (NaN or infinite logits, or
    a distribution that is not one) gets its exception in its place: it fails alone, the
    others go on, and every row gets the token it would get alone."""
    generated = generated or [0] * len(params)
    tokens = logits.argmax(dim=-1)
    failed = torch.zeros(len(params), dtype=torch.bool, device=logits.device)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        drawn, valid = _draw(logits.index_select(0, rows), [params[i] for i in sampled],
                             [generators[i] for i in sampled])
        tokens = tokens.index_copy(0, rows, drawn)
        failed = failed.index_copy(0, rows, ~valid)
    bad = unusable(logits)
    picked, bad_rows, failed_rows = torch.stack([tokens, bad.long(), failed.long()]).tolist()
    out: list[int | Exception] = []
    for i, p in enumerate(params):
        if bad_rows[i]:
            out.append(NonFiniteLogitsError(generated[i]))
        elif failed_rows[i]:
            out.append(SamplingError(f"no token can be drawn at temperature {p.temperature!r} "
                                     f"and top_p {p.top_p!r}"))
        else:
            out.append(picked[i])
    return out


class TextStream:
    """One answer's tokens turned into text deltas.

    `add(token)` returns what can be sent now (None while the text may still begin a
    stop string or ends inside a multi-byte character); `done` says whether the
    generation is over (end of sequence, a stop string, or max_new_tokens). The
    end-of-sequence token is neither streamed nor counted (unless `ignore_eos`); the
    tokens that completed a stop string are streamed, without its text. `finish()`
    flushes what was held back, unless a stop string ended the answer.

    Detokenization is incremental: each token decodes only the tokens since the text
    last ended on a whole character (a window that starts where the previous one
    ended, so a tokenizer that drops a leading space drops it from both decodes alike),
    and stop strings are looked for only where a new one can end; a long answer costs
    the same per token as a short one.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: frozenset[int]):
        self.tokenizer, self.params, self.eos_ids = tokenizer, params, eos_ids
        self.ids: list[int] = []
        self.sent = ""
        self.pending: list[int] = []
        self.reason: FinishReason | None = None
        self._stable = ""
        """Text of `ids[:_read]`, which ends on a whole character."""
        self._tail = ""
        """Text the tokens after `_read` add so far (may end inside a character)."""
        self._window = (0, 0, "")
        """(start, end, text): the decode window's first token, `_read`, and the text of
        `ids[start:end]` decoded alone."""
        self._searched = 0
        """Length of `_stable` already searched for stop strings."""

    @property
    def text(self) -> str:
        return self._stable + self._tail

    def _decode(self) -> None:
        start, read, before = self._window
        text = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        new = text[len(before):]
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._stable += new
            self._tail = ""
            end = len(self.ids)
            self._window = (read, end, self.tokenizer.decode(self.ids[read:end],
                                                             skip_special_tokens=True))
        else:
            self._tail = new

    def _stop_at(self, text: str) -> int:
        """Where the first stop string begins in `text`, or -1."""
        found = [i for i in (text.find(s, max(0, self._searched - len(s) + 1))
                             for s in self.params.stop) if i >= 0]
        self._searched = len(self._stable)
        return min(found, default=-1)

    def add(self, token: int) -> Delta | None:
        if token in self.eos_ids and not self.params.ignore_eos:
            self.reason = "eos"
            return None
        self.ids.append(token)
        self.pending.append(token)
        self._decode()
        text = self.text
        cut = self._stop_at(text) if self.params.stop else -1
        if cut >= 0:
            # The text ends before the stop string; the tokens that made it are still
            # handed out (with no text, if need be), so every counted token is streamed.
            self.reason = "stop"
            return self._take(text, max(cut, len(self.sent)))
        if len(self.ids) >= self.params.max_new_tokens:
            self.reason = "length"
        ready = len(text) - held_back(text, self.params.stop)
        if not text.endswith("\ufffd") and ready > len(self.sent):
            return self._take(text, ready)
        return None

    def finish(self, reason: FinishReason | None = None) -> Delta | None:
        """End the answer (with `reason` when it did not end by itself) and flush."""
        if self.reason is None:
            self.reason = reason or "length"
        if self.reason == "stop":
            return None
        text = self.text
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
