"""Failures of the cache's store, in an operator's terms.

A failure is a `StoreError` that says what went wrong and what to change (a TLS
certificate without the host name of the URL, a refused password, a refused
connection, ...), never the password, and which kind of failure it is (`REASONS`), for
metrics and health; `diagnose` makes one of a redis-py exception.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import ssl
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
