"""Bytes-only key-value storage under the token cache, chosen by URL scheme.

`redis://` and `rediss://` (TLS) use Redis; `memory://` keeps an in-process LRU for
development. One value per key: a cache value is written and evicted whole.

A failure is a `StoreError` that says what went wrong in an operator's terms (a TLS
certificate without the host name of the URL, a refused password, a refused
connection, ...) and which kind of failure it is (`REASONS`), for metrics and health.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import socket
import ssl
import time
from typing import Protocol
from urllib.parse import urlparse

REASONS = ("tls", "auth", "connection", "timeout", "error")
"""Kinds of store failure: TLS handshake or certificate verification, authentication
(NOAUTH, WRONGPASS, NOPERM), connection (refused, unresolvable host, closed), timeout,
and anything else."""


class StoreError(Exception):
    """The storage backend failed or timed out (callers treat it as a miss).

    The message says what failed and what to change; `reason` is one of `REASONS`;
    `summary` says what failed without naming hosts or ports (for health answers on a
    public port)."""

    def __init__(self, message: str, reason: str = "error", summary: str = ""):
        super().__init__(message)
        self.reason, self.summary = reason, summary or message


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None: ...
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def delete_if_equal(self, key: str, value: bytes) -> bool: ...
    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


# Compare-and-act on one key, atomic in Redis: a lock is released or extended only by
# the holder whose token it still stores.
DELETE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0"""
EXPIRE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0"""


@dataclasses.dataclass(frozen=True)
class RedisEndpoint:
    """Where a Redis store connects, as failure messages name it (never the password)."""

    host: str
    port: int | None
    tls: bool
    password: bool
    """Whether a password is configured (in the URL or given separately)."""
    timeout_s: float

    @classmethod
    def of(cls, url: str, password: bool, timeout_s: float) -> RedisEndpoint:
        parts = urlparse(url)
        if parts.scheme == "unix":
            return cls(parts.path, None, False, password or bool(parts.password), timeout_s)
        return cls(parts.hostname or "localhost", parts.port or 6379, parts.scheme == "rediss",
                   password or bool(parts.password), timeout_s)

    @property
    def address(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def san(self) -> str:
        """The subjectAltName entry a server certificate needs for this host."""
        try:
            ipaddress.ip_address(self.host)
            return f"IP:{self.host}"
        except ValueError:
            return f"DNS:{self.host}"


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _tls_error(error: ssl.SSLError, where: RedisEndpoint) -> StoreError:
    if not isinstance(error, ssl.SSLCertVerificationError):
        return StoreError(f"TLS handshake with Redis at {where.address} failed "
                          f"({error.reason or error}): does the server speak TLS on this port?",
                          "tls", "TLS handshake with Redis failed")
    problem = str(error.verify_message or error)
    if "mismatch" in problem:
        return StoreError(
            f"Redis TLS certificate does not match host {where.host}: set the certificate's "
            f"subjectAltName to {where.san()} (the host of cache.url), or put a host name "
            "the certificate carries in cache.url", "tls",
            "Redis TLS certificate does not match the host name of cache.url")
    if "issuer" in problem or "self-signed" in problem or "self signed" in problem:
        return StoreError(f"Redis TLS certificate of {where.address} is not trusted "
                          f"({problem}): set cache.tls_ca_file to the CA that signed it",
                          "tls", "Redis TLS certificate is not trusted")
    return StoreError(f"Redis TLS certificate of {where.address} failed verification: "
                      f"{problem}", "tls", f"Redis TLS certificate failed verification: "
                      f"{problem}")


def _auth_error(error: BaseException, where: RedisEndpoint) -> StoreError:
    text = str(error)
    if "without any password" in text or "no password is set" in text:
        return StoreError(f"Redis at {where.address} has no password but one was sent: "
                          "unset cache.password or set the server's requirepass", "auth",
                          "a password was sent to a Redis without one")
    if not where.password:
        return StoreError(f"Redis at {where.address} requires a password (NOAUTH): set "
                          "cache.password (HERO_VISION_CACHE__PASSWORD)", "auth",
                          "Redis requires a password (NOAUTH)")
    return StoreError(f"Redis at {where.address} refused the password (WRONGPASS): "
                      "cache.password (HERO_VISION_CACHE__PASSWORD) must be the server's",
                      "auth", "Redis refused the password (WRONGPASS)")


def _connection_error(chain: list[BaseException], where: RedisEndpoint,
                      answered: bool) -> StoreError:
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        return StoreError(f"Redis at {where.address} refused the connection: is it running "
                          "and listening there?", "connection", "Redis refused the connection")
    if any(isinstance(c, socket.gaierror) for c in chain):
        return StoreError(f"Redis host {where.host} does not resolve: check cache.url",
                          "connection", "the Redis host name does not resolve")
    hint = ("" if where.tls or answered
            else " (a server that speaks only TLS does this: use rediss://)")
    return StoreError(f"Redis at {where.address} dropped the connection ({chain[0]}){hint}",
                      "connection", "the connection to Redis failed")


def diagnose(exc: BaseException, where: RedisEndpoint, answered: bool = False) -> StoreError:
    """The `StoreError` for a redis-py failure `exc`: its kind and what to change.
    `answered`: whether the server answered before (then a dropped connection is not
    a hint of a protocol mismatch)."""
    from redis import exceptions as rx

    chain = _chain(exc)
    for cause in chain:
        if isinstance(cause, ssl.SSLError):
            return _tls_error(cause, where)
    if isinstance(exc, rx.NoPermissionError | rx.AuthorizationError):
        return StoreError(f"Redis at {where.address} denied a command ({exc}): give the "
                          "cache's user read, write and scripting rights on its keys",
                          "auth", "Redis denied a command (NOPERM)")
    if isinstance(exc, rx.AuthenticationError):
        return _auth_error(exc, where)
    if any(isinstance(c, TimeoutError | rx.TimeoutError) for c in chain):
        hint = (" (over TLS, a server that does not speak TLS on this port looks like this)"
                if where.tls else "")
        return StoreError(f"Redis at {where.address} did not answer within "
                          f"{where.timeout_s:g} s{hint}", "timeout",
                          "Redis did not answer in time")
    if isinstance(exc, rx.ConnectionError | OSError):
        return _connection_error(chain, where, answered)
    return StoreError(f"Redis at {where.address} failed: {type(exc).__name__}: {exc}",
                      "error", f"Redis failed ({type(exc).__name__})")


class RedisStore:
    """Redis via redis.asyncio (hiredis parser), with per-call timeouts."""

    def __init__(self, url: str, timeout_s: float, connect_timeout_s: float,
                 password: str | None = None, tls_ca_file: str | None = None):
        import redis.asyncio as aioredis

        self._errors = (aioredis.RedisError, OSError, asyncio.TimeoutError)
        extra: dict[str, object] = {}
        if password:
            extra["password"] = password
        if tls_ca_file and url.startswith("rediss://"):
            extra["ssl_ca_certs"] = tls_ca_file
        self.client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
            retry_on_timeout=False, health_check_interval=30, **extra)
        self.timeout_s = timeout_s
        self.endpoint = RedisEndpoint.of(url, bool(password), timeout_s)
        self.answered = False
        """Whether the server has answered a call."""

    async def _run(self, op):  # type: ignore[no-untyped-def]
        try:
            result = await asyncio.wait_for(op, self.timeout_s)
        except self._errors as exc:
            raise diagnose(exc, self.endpoint, self.answered) from exc
        self.answered = True
        return result

    async def get(self, key: str) -> bytes | None:
        value = await self._run(self.client.get(key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        px = int(ttl_s * 1000) if ttl_s else None
        await self._run(self.client.set(key, value, px=px))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._run(self.client.set(key, value, px=int(ttl_s * 1000), nx=True)))

    async def exists(self, key: str) -> bool:
        return bool(await self._run(self.client.exists(key)))

    async def delete(self, key: str) -> None:
        await self._run(self.client.delete(key))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        return bool(await self._run(self.client.eval(DELETE_IF_EQUAL, 1, key, value)))

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._run(self.client.eval(EXPIRE_IF_EQUAL, 1, key, value,
                                                     int(ttl_s * 1000))))

    async def ping(self) -> None:
        await self._run(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class MemoryStore:
    """In-process LRU bounded in bytes, with TTLs; for development and single replicas."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self.size = 0

    async def get(self, key: str) -> bytes | None:
        item = self.items.get(key)
        if item is None:
            return None
        if item[1] and item[1] < time.monotonic():
            await self.delete(key)
            return None
        self.items.move_to_end(key)
        return item[0]

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        await self.delete(key)
        self.items[key] = (value, time.monotonic() + ttl_s if ttl_s else 0.0)
        self.size += len(value)
        while self.size > self.max_bytes and self.items:
            _, (old, _) = self.items.popitem(last=False)
            self.size -= len(old)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if await self.get(key) is not None:
            return False
        await self.set(key, value, ttl_s)
        return True

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def delete(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.size -= len(item[0])

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        if await self.get(key) != value:
            return False
        await self.delete(key)
        return True

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool:
        if await self.get(key) != value:
            return False
        self.items[key] = (value, time.monotonic() + ttl_s)
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.items.clear()
        self.size = 0


def open_store(url: str, timeout_s: float = 0.25, connect_timeout_s: float = 0.5,
               password: str | None = None, tls_ca_file: str | None = None) -> Store:
    """The store for `url`: redis://host:port/db, rediss://..., or memory://. A password
    given here (from a secret) wins over none in the URL; it never appears in logs."""
    scheme = urlparse(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, timeout_s, connect_timeout_s, password, tls_ca_file)
    if scheme == "memory":
        return MemoryStore()
    raise ValueError(f"unsupported cache URL scheme {scheme!r}; use redis://, rediss:// or "
                     "memory://")
