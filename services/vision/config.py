"""Configuration of the vision service: the `args` of the Serve application.

The Serve config YAML (`serve_config.yaml`) is the single source, whoever deploys it
(`hero serve`, `python -m services.vision`, KubeRay's `serveConfigV2`): Ray Serve passes
its `applications[].args` to `build_app`, and every replica loads `VisionConfig` from
them and its own environment (`HERO_VISION_*`, nested keys joined by `__`), so secrets
reach each process from its environment and never travel in the args.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from hero_core.config import DEFAULT_LIMITS
from services.common.auth import BearerTokens, require_tokens
from services.common.config import ServiceSettings

ENV_PREFIX = "HERO_VISION_"


class CacheConfig(BaseModel):
    """Where and how pruned tokens are cached."""

    model_config = ConfigDict(extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    """redis://, rediss:// (TLS; credentials in the URL or REDIS_PASSWORD) or memory://."""
    ttl_s: float | None = Field(86400.0, gt=0)
    """Lifetime of an entry; None keeps entries until Redis evicts them (LRU)."""
    max_entry_bytes: int = Field(16 << 20, ge=1)
    """Entries larger than this are not stored."""
    timeout_s: float = Field(0.25, gt=0)
    """Per-operation timeout; a slower Redis is a miss."""
    password: SecretStr | None = None
    """The Redis password (from a secret, as `HERO_VISION_CACHE__PASSWORD`); unset = none."""
    tls_ca_file: str | None = None
    """CA bundle that signs the Redis server certificate (rediss:// only)."""
    secret: SecretStr | None = None
    """Key of the entries' HMAC-SHA256 (from a secret, as `HERO_VISION_CACHE__SECRET`):
    entries without a valid MAC (written by anyone without it) are dropped. Required
    with a Redis cache unless `allow_unsigned` (see `VisionConfig.require_cache_secret`)."""
    allow_unsigned: bool = False
    """Run a Redis cache without `secret`: anyone who can write to that Redis can then
    forge entries. Only for private test setups; `memory://` never needs a secret."""
    lock_ttl_s: float = Field(10.0, gt=0)
    """Lifetime of the lock a replica holds while it encodes an image; it renews the lock
    every third of that, so a replica that dies stalls others at most this long."""
    store_images: bool = True
    """Keep the encoded image too, so clients can send only its id later."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Dtype of cached features; also the dtype sent to the language service."""


class BatchConfig(BaseModel):
    """Dynamic batching of the encoder (`@serve.batch`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1)
    """Images per vision-tower pass (each brings its 3-5 crops)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a partial batch waits for more images."""


class OpenAIConfig(BaseModel):
    """The OpenAI-compatible HTTP API (`services.vision.openai`)."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = None
    """The model id `GET /v1/models` lists and a request's `model` may name; unset: the
    `model` setting as given."""
    default_max_tokens: int = Field(256, ge=1)
    """Tokens to generate at most when a request sets neither `max_tokens` nor
    `max_completion_tokens` (the language service's own limit still applies)."""
    image_url_hosts: list[str] = Field(default_factory=list)
    """Hosts (`name` or `name:port`) whose http(s) image URLs the service fetches; empty:
    every remote image URL is refused, so a request cannot make the service reach
    other hosts (send the image as a data: URI or by its id)."""
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    """How long fetching one remote image may take in all (at most `max_image_bytes`)."""


class VisionConfig(ServiceSettings):
    """Everything the vision service reads at start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    model: str = "tiny"
    """Preset, checkpoint directory or hub id (as for the language service)."""
    models_dir: Path = Path("models")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    api_tokens: SecretStr | None = None
    """Comma-separated bearer tokens the public API accepts (from a secret, as
    `HERO_VISION_API_TOKENS`). Without tokens the service refuses to start unless
    `allow_unauthenticated` is set."""
    allow_unauthenticated: bool = False
    """Start without `api_tokens`, accepting every caller (local use: `hero serve`, the
    Compose default profile). Tokens, when given, are required all the same."""
    torch_threads: int = Field(0, ge=0)
    """CPU threads for the encoder's torch ops; 0 = every core. Ray limits a replica to
    its `num_cpus` threads otherwise, which starves a CPU encoder."""
    language_target: str = "127.0.0.1:50052"
    """The language service: host:port, or dns:///name:port for a headless Service whose
    every address is a language pod (calls are then balanced over them)."""
    language_token: SecretStr | None = None
    """The token sent to the language service, when it requires one (one of its
    `api_tokens`; from a secret, as `HERO_VISION_LANGUAGE_TOKEN`); unset = none sent."""
    language_lb_policy: Literal["round_robin", "pick_first"] = "round_robin"
    """How calls spread over the addresses the target resolves to: round_robin balances
    every call; pick_first keeps one connection."""
    default_method: str = "hero"
    default_retention: float = Field(0.111, gt=0, le=1)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-method config overrides, e.g. {"hero": {"max_tokens_per_crop": 144}}; they
    change the method's fingerprint, hence its cache keys."""
    max_image_bytes: int = Field(DEFAULT_LIMITS.max_image_bytes, ge=1)
    max_image_pixels: int = Field(DEFAULT_LIMITS.max_image_pixels, ge=1)
    max_prompt_chars: int = Field(DEFAULT_LIMITS.max_prompt_chars, ge=1)
    language_timeout_s: float = Field(300.0, gt=0)
    """Deadline of one call to the language service."""
    language_tls_ca_file: str | None = None
    """CA of the language service's certificate; set it to speak TLS to that service."""
    language_tls_cert_file: str | None = None
    """Client certificate for mutual TLS with the language service (with the key)."""
    language_tls_key_file: str | None = None
    language_retries: int = Field(2, ge=0)
    """Retries of a language call that fails UNAVAILABLE before any text was streamed."""
    language_backoff_s: float = Field(0.2, ge=0)
    """First retry delay; doubles each retry."""
    language_reconnect_max_s: float = Field(1.0, gt=0)
    """Longest pause between attempts to reconnect to a language service that is down
    (gRPC's reconnect backoff, which otherwise grows to 120 s): how soon a restarted
    service is found. A retry waits up to twice this for the connection."""
    stream_coalesce: bool = True
    """Merge the language service's text deltas that arrive while the previous event is
    still on its way to the client into one event (lossless: text and token ids
    concatenated), so a busy replica relays fewer, larger messages; a client whose stream
    keeps up gets each delta as it comes."""
    stream_interval_ms: float = Field(0.0, ge=0, le=1000)
    """With `stream_coalesce`: how long a delta (not an answer's first) may wait for more
    before it is relayed; 0 relays it as soon as the stream is free."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)

    @property
    def max_request_bytes(self) -> int:
        """Largest public request worth reading: the largest image, the longest prompt in
        UTF-8, and room for the other fields. Serve's gRPC proxy is bounded to this
        (`RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`, see `proxy_env`), so a larger upload is refused
        by the proxy as it arrives instead of being read whole and handed to a replica."""
        return self.max_image_bytes + 4 * self.max_prompt_chars + (64 << 10)

    @property
    def max_http_body_bytes(self) -> int:
        """Largest body the OpenAI-compatible API reads: the largest image as base64, the
        longest prompt with every character JSON-escaped (`\\uXXXX`), and room for the
        other fields. A larger body is refused (413) from its Content-Length, or once
        that many bytes have arrived, before any of it is parsed."""
        return 4 * -(-self.max_image_bytes // 3) + 6 * self.max_prompt_chars + (64 << 10)

    def proxy_env(self) -> dict[str, str]:
        """Environment of the Ray processes that run Serve's proxy."""
        return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(self.max_request_bytes)}

    def bearer_tokens(self) -> BearerTokens:
        """The tokens the public API accepts; `MissingTokensError` when there are none
        and `allow_unauthenticated` is not set (the service does not start)."""
        return require_tokens(self.api_tokens, self.allow_unauthenticated, ENV_PREFIX)

    def require_cache_secret(self) -> None:
        """`ConfigError` when the cache is a Redis and entries would carry no MAC (no
        `cache.secret`) without `cache.allow_unsigned`: the service refuses to start
        rather than serve what anyone with write access to Redis put there."""
        from hero_core.errors import ConfigError
        from services.common.config import secret_value

        unsigned = not secret_value(self.cache.secret) and not self.cache.allow_unsigned
        if unsigned and not self.cache.url.startswith("memory:"):
            raise ConfigError(
                "cache.secret is not set: anyone who can write to the Redis cache could "
                "forge the tokens served for any image. Set HERO_VISION_CACHE__SECRET (e.g. "
                "`openssl rand -hex 32`, the same on every replica), or set "
                "cache.allow_unsigned: true for a private test setup")

    def method(self, name: str) -> Any:
        """The pruning method `name` with this deployment's options."""
        from hero_core.methods import create_method

        return create_method(name, **self.method_options.get(name, {}))

    @model_validator(mode="after")
    def _methods_exist(self) -> VisionConfig:
        for name in {self.default_method, *self.method_options}:
            self.method(name)  # unknown names and bad options fail at start
        return self
