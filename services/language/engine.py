"""The types engines and the server share: a leaf module (it imports no engine, and no
module that imports it); the server never imports model classes.

`Engine` is the protocol the server talks to, `EngineRequest` what it hands an engine
(the prompt's token ids kept on it once the model has checked it), `kv_tokens` the KV
cache one request needs. Three implementations, chosen by the `engine` setting where the
service is assembled (`services/language/app.py`):

* `batched` (`services/language/batching/`): continuous batching on transformers'
  model, admission by KV tokens. The default, on CPU and on GPU without vLLM.
* `sequential` (`sequential.py`): one request at a time per slot, each with its own
  forward per token. The reference the batched engine is measured against.
* `vllm` (`vllm_engine.py`): vLLM's async engine fed with our prompt embeddings, for
  GPU deployments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

import torch

from hero_core.packing import PackedTokens
from hero_core.tiling import TilingSpec
from services.language.decoding import Delta, FinishReason, SamplingParams

__all__ = [
    "Delta",
    "Engine",
    "EngineInfo",
    "EngineObserver",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "Finished",
    "SamplingParams",
    "kv_tokens",
]


def kv_tokens(prompt_length: int, max_new_tokens: int) -> int:
    """KV cache tokens a request may ever need: its prompt (text plus visual embeddings)
    and every token it may generate."""
    return prompt_length + max_new_tokens


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    packed: PackedTokens
    messages: tuple[tuple[str, str], ...]
    """(role, text) turns; the image goes with the first user turn."""
    params: SamplingParams
    prompt_ids: torch.Tensor | None = None
    """Token ids `(T,)` of the chat-formatted prompt, with one image placeholder: set by
    the model's check (`LanguageModel.check`), so the prompt is tokenized once."""


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model: str
    feature_dim: int
    tiling: TilingSpec
    max_positions: int


@dataclasses.dataclass
class Finished:
    prompt_tokens: int
    """Text tokens plus visual embeddings the LLM read."""
    visual_tokens: int
    completion_tokens: int
    prefill_ms: float
    first_token_at: float
    """`time.perf_counter()` when the first token was ready (0 if none was)."""
    decode_tokens_per_s: float
    finish_reason: FinishReason
    queue_ms: float = 0.0
    """Time the request waited in the engine for room (a slot, or KV space)."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    """Sequences in prefill or decode now."""
    waiting: int
    """Sequences submitted and waiting for room."""
    room: int
    """Batch places (or slots) not taken by running sequences; 0 while the KV cache is
    what keeps a waiting sequence out."""
    kv_tokens_reserved: int = 0
    """KV tokens in the blocks running sequences hold."""
    kv_tokens_capacity: int = 0
    kv_blocks_free: int = 0
    """KV blocks no sequence holds (some of them cached prefixes, evicted on demand)."""
    kv_blocks_cached: int = 0
    """KV blocks holding a prefix that a new request can reuse."""
    preemptions: int = 0
    """Sequences preempted (their KV given back, recomputed later) since the start."""


class EngineObserver(Protocol):
    """Where an engine reports what its metrics need (the service's Prometheus metrics)."""

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """One batched decode step of `batch_size` sequences took `seconds`."""

    def observe_queue_wait(self, seconds: float) -> None:
        """A request waited `seconds` before it was admitted."""

    def observe_prefix_cache(self, tokens: int, hit_tokens: int) -> None:
        """A sequence was admitted needing the KV of `tokens` positions, `hit_tokens` of
        them found in the prefix cache."""

    def observe_preemption(self) -> None:
        """A running sequence was preempted for lack of KV blocks."""


class Engine(Protocol):
    info: EngineInfo
    observer: EngineObserver | None
    """Set by the server before the first request."""

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        """`request` with its prompt's token ids, or `InvalidInputError` for anything the
        model or the engine cannot take."""

    def stream(self, request: EngineRequest,
               deadline: float | None = None) -> AsyncIterator[Delta | Finished]:
        """Generate; text deltas, then one `Finished`. Closing the iterator early (client
        cancel) ends the generation; so does `deadline` (`time.monotonic()`)."""

    def stats(self) -> EngineStats:
        """How many sequences run and wait, and the KV in use (thread-safe)."""

    def warmup(self) -> None:
        """One tiny generation, so the first real request is not slow (blocking)."""

    def shutdown(self) -> None:
        """Stop background work; requests still running end as cancelled."""
