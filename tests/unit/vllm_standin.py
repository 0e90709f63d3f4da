"""A stand-in for vLLM's `AsyncLLM` that streams what vLLM 0.30.0 (the pinned release)
streams in DELTA mode, with the tokens computed by the tiny model.

vLLM is not installed where the tests run: its wheel is ~300 MB of CUDA kernels and
needs the CUDA build of torch, and its `vllm.outputs` cannot be imported on its own (it
imports `vllm.v1.metrics.stats`, which imports vLLM's config package and, through it,
the dependencies of its API server). So its two output classes are written out here
with the fields and semantics of vLLM 0.30.0's `vllm/outputs.py` (`CompletionOutput`,
`RequestOutput` and its `add`), and what each streamed output holds follows that
release's `vllm/v1/core/sched/utils.py` (`check_stop`), `vllm/v1/engine/detokenizer.py`
(`BaseIncrementalDetokenizer.update`, `get_next_output_text`, `check_stop_strings`),
`vllm/v1/engine/output_processor.py` (`RequestState.make_request_output`,
`RequestOutputCollector`) and `vllm/v1/engine/async_llm.py` (`AsyncLLM.generate`):

* each step's output carries that step's token ids. The end-of-sequence token is one of
  them: it finishes the request with `finish_reason` "stop" and `stop_reason` None, and
  its text is left out. With `ignore_eos` it is an ordinary token;
* a stop string finishes the request with "stop" and `stop_reason` the string; the text
  is cut before it, the step's token ids stay;
* `max_tokens` finishes it with "length";
* until the request finishes, the text keeps back `max(len(s) for s in stop) - 1`
  characters that could begin a stop string; the last output carries what is left;
* outputs the reader has not taken yet merge into one (`RequestOutput.add` with
  `aggregate=True`: texts joined, token ids extended, the later finish and stop reason);
* closing the stream, or cancelling the task that reads it, aborts the request.

The text is decoded whole at each step rather than incrementally (the same text for
the tiny model's byte-level tokenizer; a trailing incomplete character waits, as it
does in vLLM's incremental detokenizer).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch


@dataclasses.dataclass
class CompletionOutput:
    """`vllm.outputs.CompletionOutput` of vLLM 0.30.0: one completion of a request."""

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: Any
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None
    sampling_mask: Any = None
    spec_decode_metrics: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    """`vllm.outputs.RequestOutput` of vLLM 0.30.0 (the fields a completion fills)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool,
                 metrics: Any = None, lora_request: Any = None, encoder_prompt: str | None = None,
                 encoder_prompt_token_ids: list[int] | None = None,
                 num_cached_tokens: int | None = None,
                 num_cache_creation_tokens: int | None = None, *,
                 kv_transfer_params: dict[str, Any] | None = None,
                 ec_transfer_params: dict[str, Any] | None = None):
        self.request_id, self.prompt = request_id, prompt
        self.prompt_token_ids, self.prompt_logprobs = prompt_token_ids, prompt_logprobs
        self.outputs, self.finished, self.metrics = outputs, finished, metrics
        self.lora_request, self.encoder_prompt = lora_request, encoder_prompt
        self.encoder_prompt_token_ids = encoder_prompt_token_ids
        self.num_cached_tokens = num_cached_tokens
        self.num_cache_creation_tokens = num_cache_creation_tokens
        self.kv_transfer_params, self.ec_transfer_params = kv_transfer_params, ec_transfer_params

    def add(self, later: RequestOutput, aggregate: bool) -> None:
        """Fold a later output into this one (the collector does so while the reader lags)."""
        self.finished |= later.finished
        self.kv_transfer_params, self.ec_transfer_params = (later.kv_transfer_params,
                                                            later.ec_transfer_params)
        for new in later.outputs:
            same = [i for i, old in enumerate(self.outputs) if old.index == new.index]
            if not same:
                self.outputs.append(new)
            elif not aggregate:
                self.outputs[same[0]] = new
            else:
                old = self.outputs[same[0]]
                old.text += new.text
                old.token_ids = [*old.token_ids, *new.token_ids]
                old.cumulative_logprob = new.cumulative_logprob
                old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason


class Detokenizer:
    """The text side of one request: what vLLM's detokenizer and stop checks do."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.buffer = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        """Token ids whose text is part of the output (a finishing EOS is not)."""
        self.text = ""
        self.sent = 0

    def update(self, new_ids: list[int], stop_terminated: bool) -> str | None:
        """Add a step's ids; return the stop string that ends the text, if one does (the
        one that ends first; the text is cut where it begins)."""
        self.ids += new_ids[:-1] if stop_terminated else new_ids
        before = len(self.text)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [(self.text.find(s, max(0, before - len(s) + 1)), s) for s in self.stop]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return None
        at, stop = min(found, key=lambda f: f[0] + len(f[1]))
        self.text = self.text[:at]
        return stop

    def next_text(self, finished: bool) -> str:
        """The text new since the last call, less what may still begin a stop string."""
        text = self.text if finished else self.text.rstrip("\ufffd")
        end = len(text) - (0 if finished else self.buffer)
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out


class Collector:
    """`RequestOutputCollector`: the output the reader has not taken yet, into which
    later ones merge."""

    def __init__(self) -> None:
        self.output: RequestOutput | None = None
        self.ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self.output is None:
            self.output = out
        else:
            self.output.add(out, aggregate=True)
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        out, self.output = self.output, None
        self.ready.clear()
        return out


@torch.inference_mode()
def greedy_steps(model: Any, embeds: torch.Tensor, steps: int) -> Any:
    """Greedy next tokens after the prompt embeddings `(T, H)`, one per step."""
    out = model(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        yield token
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                    use_cache=True)


class StandInLLM:
    """`AsyncLLM.generate(prompt, params, request_id)` and `abort(request_id)` for
    `{"prompt_embeds": (T, H)}` prompts and greedy `SamplingParams` keyword arguments
    (`VllmEngine` built with `make_params=dict`). `burst` engine steps run between two
    awaits, so a reader falls behind and gets merged outputs when it is above 1;
    `step_s` paces the steps."""

    def __init__(self, model: Any, tokenizer: Any, eos_id: int, burst: int = 1,
                 step_s: float = 0.0):
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.burst, self.step_s = burst, step_s
        self.prompts: list[dict[str, Any]] = []
        self.params: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()

    async def generate(self, prompt: dict[str, Any], params: dict[str, Any],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        embeds = prompt["prompt_embeds"]
        assert embeds.ndim == 2 and embeds.device.type == "cpu"
        assert params["temperature"] == 0.0, "the stand-in decodes greedily only"
        self.prompts.append(prompt)
        self.params.append(params)
        outputs = Collector()
        producer = asyncio.create_task(self._run(embeds, params, request_id, outputs))
        self.running.add(request_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        finally:
            producer.cancel()
            self.running.discard(request_id)

    async def _run(self, embeds: torch.Tensor, params: dict[str, Any], request_id: str,
                   outputs: Collector) -> None:
        """The engine core and the output processor: one output per step."""
        text = Detokenizer(self.tokenizer, params["stop"])
        steps = greedy_steps(self.model, embeds, params["max_tokens"])
        for n, token in enumerate(steps, 1):
            out = self._step(text, token, n, params, request_id, len(embeds))
            outputs.put(out)
            if out.finished:
                return
            if n % self.burst == 0:
                await asyncio.sleep(self.step_s)

    def _step(self, text: Detokenizer, token: int, n: int, params: dict[str, Any],
              request_id: str, prompt_len: int) -> RequestOutput:
        reason: str | None = None
        stop_reason: str | None = None
        if token == self.eos_id and not params["ignore_eos"]:
            reason = "stop"
        elif n >= params["max_tokens"]:
            reason = "length"
        if (stop := text.update([token], reason == "stop")) is not None:
            reason, stop_reason = "stop", stop
        finished = reason is not None
        completion = CompletionOutput(0, text.next_text(finished), [token], None, None,
                                      finish_reason=reason, stop_reason=stop_reason)
        # Prompt embeddings have no token ids: vLLM reports one placeholder 0 per row.
        return RequestOutput(request_id, None, [0] * prompt_len, None, [completion], finished)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)
