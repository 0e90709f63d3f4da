"""vLLM as the generation engine on GPUs, fed with our prompt embeddings.

The language service builds the LLM's input embeddings itself, exactly as the other
engines do (projector, `image_newline`, text embeddings: `LanguageModel.prompt_embeds`),
and hands them to vLLM's async engine as an `EmbedsPrompt` (`{"prompt_embeds": (T, H)}`,
engine argument `enable_prompt_embeds=True`). vLLM loads the same LLaVA-NeXT
checkpoint with images switched off (`limit_mm_per_prompt={"image": 0}`), so it runs
the text model only and never sees pixels; it batches, schedules and pages the KV
cache, and streams deltas back (`RequestOutputKind.DELTA`).

What comes back is read into the other engines' terms (`Answer`): the same finish
reasons, no end-of-sequence token among the streamed ids, `completion_tokens` = the ids
streamed. The prompt is built in a worker thread, off the event loop.

vLLM needs CUDA (its wheels are CUDA 13 builds): it is the optional install `.[vllm]`
and the image target `language-vllm`. Nothing here imports vllm until `VllmEngine.load`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from hero_core.errors import InvalidInputError
from hero_core.models import ModelSpec
from services.language.config import VllmConfig
from services.language.decoding import Delta, FinishReason, SamplingParams
from services.language.engine import EngineObserver, EngineStats, Finished
from services.language.model import EngineRequest, LanguageModel


def engine_args(spec: ModelSpec, settings: VllmConfig) -> dict[str, Any]:
    """Keyword arguments of vLLM's `AsyncEngineArgs` for a checkpoint."""
    args: dict[str, Any] = {
        "model": settings.llm or spec.model,
        "dtype": spec.dtype,
        "enable_prompt_embeds": True,
        "limit_mm_per_prompt": {"image": 0},
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_num_seqs": settings.max_num_seqs,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enforce_eager": settings.enforce_eager,
        # Prefix caching keys a prompt-embeds block by the SHA-256 of its embedding rows'
        # bytes, chained over the blocks before it (vLLM 0.30.0,
        # vllm/v1/core/kv_cache_utils.py: `_gen_prompt_embeds_extra_hash_keys` hashes
        # `tensor_data(request.prompt_embeds[start:end])`, `hash_block_tokens` chains
        # it); `prompt` keeps those bytes the same for the same inputs.
        "enable_prefix_caching": settings.prefix_caching,
    }
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    if spec.revision is not None:
        args["revision"] = spec.revision
    return args


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vLLM's `SamplingParams` for ours (temperature 0 is greedy in
    both; stop strings are left out of the text in both; seed None is unseeded in both)."""
    return {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "seed": params.seed, "stop": list(params.stop),
            "ignore_eos": params.ignore_eos, "skip_special_tokens": True}


def finish_reason(reason: str | None, stop_reason: Any) -> FinishReason:
    """vLLM's finish reason in our terms: its "stop" is a stop string when `stop_reason`
    is that string, else the end-of-sequence token."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    return "cancelled"


@dataclasses.dataclass
class Answer:
    """One request's answer as vLLM streams it (`RequestOutputKind.DELTA`: each
    `RequestOutput` carries the text and token ids new since the previous one, several
    steps' worth when the reader fell behind), read into the other engines' terms."""

    tokens: int = 0
    """Token ids streamed so far."""
    first_at: float = 0.0
    reason: FinishReason | None = None
    """Set once vLLM says the request finished."""

    def read(self, out: Any) -> Delta | None:
        """The delta to stream for one `RequestOutput` (None if it carries nothing).

        On an end-of-sequence finish (reason "stop", `stop_reason` None or a stop token
        id) vLLM's last token id is that token; its text is already left out. The other
        engines neither stream nor count it, so it is dropped here too. With
        `ignore_eos` vLLM never finishes so, and end-of-sequence tokens stay like any
        other. A stop string ends the text before it, and the token ids that made it
        stay, as in the other engines.
        """
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        if ids and not self.first_at:
            self.first_at = time.perf_counter()
        if out.finished:
            self.reason = finish_reason(completion.finish_reason, completion.stop_reason)
            if self.reason == "eos" and ids:
                ids.pop()
        self.tokens += len(ids)
        return Delta(completion.text, ids) if ids or completion.text else None

    def finished(self, prompt_tokens: int, visual_tokens: int, submitted: float) -> Finished:
        """The closing `Finished` ("cancelled" unless vLLM finished the request)."""
        n, first_at = self.tokens, self.first_at
        decode_s = time.perf_counter() - first_at if first_at else 0.0
        return Finished(prompt_tokens, visual_tokens, n,
                        (first_at - submitted) * 1e3 if first_at else 0.0, first_at,
                        (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                        self.reason or "cancelled")


class VllmEngine:
    """Our prompt embeddings through vLLM's `AsyncLLM` (or anything with its
    `generate(prompt, sampling_params, request_id)` and `abort(request_id)`)."""

    def __init__(self, model: LanguageModel, llm: Any,
                 make_params: Callable[..., Any], max_num_seqs: int,
                 max_model_len: int | None = None):
        self.model, self.llm, self.make_params = model, llm, make_params
        self.info = model.info
        self.observer: EngineObserver | None = None
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or model.info.max_positions
        self._in_flight = 0

    @classmethod
    def load(cls, spec: ModelSpec, settings: VllmConfig) -> VllmEngine:
        """Embedding parts on `spec.device` and vLLM's engine on the GPU(s)."""
        from vllm import AsyncEngineArgs
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        model = LanguageModel(spec, parts="embeddings")
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(spec, settings)))

        def make_params(**kwargs: Any) -> Any:
            return VllmSamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)

        return cls(model, llm, make_params, settings.max_num_seqs, settings.max_model_len)

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        request = self.model.check(request, max_prompt_tokens)
        needed = self.model.needs(request)
        if needed > self.max_model_len:
            raise InvalidInputError(f"prompt + visual tokens + max_new_tokens = {needed} "
                                    f"exceeds max_model_len={self.max_model_len}; lower "
                                    "max_new_tokens or the retention")
        return request

    def stats(self) -> EngineStats:
        # vLLM queues and schedules internally; what it holds counts as running.
        return EngineStats(self._in_flight, 0, max(0, self.max_num_seqs - self._in_flight))

    def prompt(self, request: EngineRequest) -> dict[str, Any]:
        """The `EmbedsPrompt` for a request: `(T, H)` in the model's dtype, on the CPU
        (vLLM moves it to its worker process and GPU itself).

        vLLM's prefix cache matches prompt-embeds blocks by their bytes, so identical
        inputs must give bit-identical embeddings: they are built for this request alone
        (its own projector call over its own kept tokens, never batched with another
        request's, so no row depends on what else runs), from the features cast to the
        model's fixed dtype, with text rows looked up in the embedding table. The same
        kept tokens after the same text therefore give the same rows whatever the
        question or the turn (`tests/unit/test_vllm_engine.py`)."""
        return {"prompt_embeds": self.model.prompt_embeds(request).cpu().contiguous()}

    async def stream(self, request: EngineRequest,
                     deadline: float | None = None) -> AsyncIterator[Delta | Finished]:
        # Tokenizing, the projector and the copy to the CPU block for a while: they run
        # in a worker thread, so the event loop goes on serving every other call.
        prompt = await asyncio.to_thread(self.prompt, request)
        length = int(prompt["prompt_embeds"].shape[0])
        answer, submitted = Answer(), time.perf_counter()
        if deadline is None or time.monotonic() < deadline:
            params = self.make_params(**sampling_kwargs(request.params))
            request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
            outputs = self.llm.generate(prompt, params, request_id)
            self._in_flight += 1
            try:
                while answer.reason is None:
                    timeout = None if deadline is None else deadline - time.monotonic()
                    try:
                        out = await asyncio.wait_for(anext(outputs), timeout)
                    except (TimeoutError, StopAsyncIteration):
                        break
                    if (delta := answer.read(out)) is not None:
                        yield delta
            finally:
                self._in_flight -= 1
                if answer.reason is None:  # cancelled, past its deadline, or the stream broke
                    await outputs.aclose()
                    await self.llm.abort(request_id)
        yield answer.finished(length, request.packed.num_embeddings, submitted)

    def warmup(self) -> None:
        """Nothing to do: vLLM profiles memory and captures CUDA graphs while it loads."""

    def shutdown(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
