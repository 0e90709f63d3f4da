"""Configuration of the language service: a YAML file, then `HERO_LANGUAGE_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from hero_core.config import DEFAULT_LIMITS
from services.common.auth import BearerTokens, require_tokens
from services.common.codec import MAX_CHUNK_BYTES
from services.common.config import ServiceSettings
from services.common.params import MAX_MESSAGES, MAX_REQUEST_ID_CHARS, MAX_ROLE_CHARS

ENV_PREFIX = "HERO_LANGUAGE_"
UTF8_MAX = 4
"""Most UTF-8 bytes per character."""
SCALAR = 1 + 10
"""Most bytes of one scalar field on the wire: a tag and the longest varint."""
LISTED_U32 = 1 + 5
"""Most bytes of one element of a repeated uint32 field: its varint, and its tag when the
sender does not pack the field."""


def _field(payload: int) -> int:
    """Most bytes of one length-delimited field carrying `payload` bytes: tag and length
    prefix (at most 1 + 5 bytes below 4 GiB)."""
    return 1 + 5 + payload


class LimitsConfig(BaseModel):
    """Per-request limits; a request past any of them gets INVALID_ARGUMENT."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(512, ge=1)
    """Largest max_new_tokens a request may ask for."""
    max_prompt_tokens: int = Field(2048, ge=1)
    """Longest prompt in tokens, visual tokens excluded."""
    max_prompt_chars: int = Field(DEFAULT_LIMITS.max_prompt_chars, ge=1)
    """Longest prompt in characters (checked before tokenising)."""
    max_visual_tokens: int = Field(8192, ge=1)
    """Most visual tokens one request may carry."""
    max_stop_strings: int = Field(8, ge=0)
    max_stop_chars: int = Field(64, ge=1)
    max_messages: int = Field(MAX_MESSAGES, ge=1)
    """Most chat turns in one request."""

    @property
    def max_message_bytes(self) -> int:
        """The largest message of a request within every limit (a Generate header, its
        visual tokens, one chunk; a Validate header), as protobuf encodes it: the
        server's receive limit, so a valid request never meets a transport limit."""
        text = UTF8_MAX * self.max_prompt_chars
        chat = _field(self.max_messages * (_field(UTF8_MAX * MAX_ROLE_CHARS) + 2 * _field(0))
                      + text)
        params = _field(5 * SCALAR + self.max_stop_strings
                        * _field(UTF8_MAX * self.max_stop_chars))
        header = _field(_field(UTF8_MAX * MAX_REQUEST_ID_CHARS) + max(chat, _field(text))
                        + params)
        per_token = _field(LISTED_U32 * self.max_visual_tokens)
        layout = _field(6 * SCALAR + 4 * per_token)
        features = _field(4 * SCALAR + _field(2 * SCALAR)
                          + _field(4 * self.max_visual_tokens))  # int8 row scales
        chunk = _field(SCALAR + _field(MAX_CHUNK_BYTES))
        return max(header, _field(layout + features), chunk)


class BatchingConfig(BaseModel):
    """The batched engine: how many sequences decode together and how much KV they share."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1)
    """Most sequences in prefill or decode at once."""
    kv_cache_tokens: int = Field(16384, ge=16)
    """KV cache size in tokens (whole blocks of it are used), shared by the running
    sequences; each holds the blocks its prompt, visual tokens and answer so far fill
    (HERO's shorter prompts fit more)."""
    kv_cache_bytes: int | None = Field(None, ge=1)
    """KV cache size in bytes instead (tokens = bytes / the model's KV bytes per token)."""
    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV block: the unit of allocation and of prefix reuse."""
    prefix_cache: bool = True
    """Reuse the KV blocks of a prefix another request computed (same kept visual tokens
    after the same text) instead of computing them again."""
    kv_allocation: Literal["grow", "reserve"] = "grow"
    """grow: a sequence takes a block when its answer needs one, and the youngest is
    preempted (recomputed later) when the pool runs out; reserve: it takes the blocks
    of prompt + max_new_tokens at admission and is never preempted."""
    max_bypass: int = Field(16, ge=0)
    """Most later requests admitted past one that does not fit yet; after that it is
    next (0: first come, first served)."""
    max_prefill_tokens_per_step: int = Field(512, ge=1)
    """Prompt tokens prefilled per step while other sequences decode: how long a new
    prompt may stall them. With nobody decoding, a prompt goes in one piece."""

    @model_validator(mode="after")
    def _a_block_fits(self) -> BatchingConfig:
        if self.kv_cache_bytes is None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least "
                             f"one block (block_size={self.block_size})")
        return self


class VllmConfig(BaseModel):
    """The vLLM engine (GPU deployments; `pip install '.[vllm]'`)."""

    model_config = ConfigDict(extra="forbid")

    llm: str | None = None
    """Checkpoint of the LLM alone (the text backbone of `model`) for vLLM to load;
    None: `model` itself."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Share of GPU memory vLLM may use for weights, activations and KV cache."""
    max_num_seqs: int = Field(64, ge=1)
    """Most sequences vLLM batches in one step."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length; None: the model's."""
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    """Skip CUDA graphs (faster start, slower decode)."""
    prefix_caching: bool = True
    """vLLM's automatic prefix caching: a request reuses the KV blocks whose prompt
    embeddings (bytes) and every earlier block's match a cached request's."""


WireDType = Literal["float32", "float16", "bfloat16", "int8"]


class LanguageConfig(ServiceSettings):
    """Everything the language service reads at start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    model: str = "tiny"
    """Preset (tiny, llava-v1.6-vicuna-7b, ...), checkpoint directory or hub id."""
    models_dir: Path = Path("models")
    """Where the tiny preset lives."""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1, ..."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 inside a container."""
    port: int = Field(50052, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    engine: Literal["batched", "sequential", "vllm"] = "batched"
    """batched: continuous batching on transformers (CPU or GPU); sequential: one
    request per slot (the reference); vllm: vLLM on GPUs."""
    max_concurrency: int = Field(1, ge=1)
    """Slots of the sequential engine (requests that run at once, each in a thread)."""
    max_queue: int = Field(32, ge=0)
    """Requests that may wait for room (a batch place and KV space, or a slot); past
    that, RESOURCE_EXHAUSTED at once."""
    accepted_dtypes: list[WireDType] = Field(
        default_factory=lambda: list(get_args(WireDType)))
    """Feature dtypes accepted on the wire."""
    tls_cert_file: Path | None = None
    """Server certificate (PEM); with `tls_key_file` the port speaks TLS only."""
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """CA of client certificates; set it to require mutual TLS (the vision service's)."""
    api_tokens: SecretStr | None = None
    """Comma-separated bearer tokens the LanguageService accepts (from a secret, as
    `HERO_LANGUAGE_API_TOKENS`; health and reflection never need one). Without tokens the
    service refuses to start unless `allow_unauthenticated` is set."""
    allow_unauthenticated: bool = False
    """Start without `api_tokens`, accepting every caller (local use: `hero serve`, the
    Compose default profile). Tokens, when given, are required all the same."""
    reflection: bool = True
    """Serve gRPC server reflection (grpcurl, Postman)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Prometheus /metrics port; 0 turns it off."""
    shutdown_grace_s: float = Field(300.0, ge=0)
    """How long running calls may finish after SIGTERM (new calls are refused with
    UNAVAILABLE meanwhile); the calls still running then end with UNAVAILABLE. The default
    covers the longest call the vision service makes (its `language_timeout_s`, 300 s)."""
    max_connection_age_s: float = Field(300.0, gt=0)
    """Clients' connections are closed (gracefully) after this long, so clients that
    balance over DNS (the vision service) re-resolve and reach pods added since."""
    max_connection_age_grace_s: float = Field(600.0, ge=0)
    """How long calls on an aged connection may still run (a long streamed answer)."""
    warmup: bool = True
    """Run one tiny generation before reporting SERVING."""
    stream_coalesce: bool = True
    """Merge the text deltas that arrive while a call's previous response is still being
    written into one response (lossless: text and token ids concatenated), so a busy
    service sends fewer, larger messages; a call whose writer keeps up gets each delta as
    it comes."""
    stream_interval_ms: float = Field(20.0, ge=0, le=1000)
    """With `stream_coalesce`: how long a delta (not a stream's first) may wait for more
    before it is sent; 0 sends it as soon as the writer is free. The default bounds the
    added inter-token latency to 20 ms and merges ~5 tokens per message at the tiny
    model's per-stream decode rate (docs/BENCHMARKS.md, the relay section)."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)

    def bearer_tokens(self) -> BearerTokens:
        """The tokens the LanguageService accepts; `MissingTokensError` when there are
        none and `allow_unauthenticated` is not set (the service does not start)."""
        return require_tokens(self.api_tokens, self.allow_unauthenticated, ENV_PREFIX)

    @model_validator(mode="after")
    def _tls_is_complete(self) -> LanguageConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                             "tls_key_file")
        return self
