"""Bearer-token authentication of gRPC calls, the same for both services.

The accepted tokens come from the service's settings, filled from a secret (comma-
separated, so a token can be rotated by accepting old and new for a while). A service
without tokens refuses to start (`require_tokens`) unless its settings turn
authentication off explicitly (`allow_unauthenticated`, for local use). Tokens are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

from services.common.errors import UnauthenticatedError

log = logging.getLogger("hero.auth")


class MissingTokensError(RuntimeError):
    """A service was about to start with no API tokens while authentication was not
    turned off explicitly: it refuses to run with its API open."""


class BearerTokens:
    """The tokens a service accepts in `authorization: Bearer <token>` metadata."""

    def __init__(self, tokens: Iterable[str]):
        self._accepted = [t.strip().encode() for t in tokens if t.strip()]

    @classmethod
    def from_secret(cls, secret: SecretStr | None) -> BearerTokens:
        """The tokens of a comma-separated secret (none: authentication off)."""
        return cls((secret.get_secret_value() if secret is not None else "").split(","))

    @property
    def enabled(self) -> bool:
        return bool(self._accepted)

    def check(self, metadata: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """`UnauthenticatedError` unless `metadata` (a mapping, or a call's metadata pairs)
        carries exactly one `authorization` entry with an accepted token (or
        authentication is off)."""
        if not self._accepted:
            return
        pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
        values = [value for key, value in pairs if key == "authorization"]
        scheme, _, token = (values[0] if len(values) == 1 and isinstance(values[0], str)
                            else "").partition(" ")
        given = token.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, t)
                                                  for t in self._accepted):
            raise UnauthenticatedError("send one valid token as 'authorization: Bearer "
                                       "<token>'")


def bearer_metadata(token: str | None) -> list[tuple[str, str]] | None:
    """Call metadata carrying `token` (None without one)."""
    return [("authorization", f"Bearer {token}")] if token else None


def require_tokens(secret: SecretStr | None, allow_unauthenticated: bool,
                   env_prefix: str) -> BearerTokens:
    """The tokens of `secret`; with none, `MissingTokensError` unless
    `allow_unauthenticated` (then every caller is accepted, and the log says so).
    `env_prefix` names the service's variables in the messages."""
    tokens = BearerTokens.from_secret(secret)
    if tokens.enabled:
        return tokens
    if not allow_unauthenticated:
        raise MissingTokensError(
            f"no API tokens: set {env_prefix}API_TOKENS (comma-separated bearer tokens, "
            f"from a secret), or {env_prefix}ALLOW_UNAUTHENTICATED=true (the setting "
            "allow_unauthenticated) to run without authentication, for local use only")
    log.warning("authentication is off (allow_unauthenticated, %sALLOW_UNAUTHENTICATED, "
                "is set and no API tokens are configured): every caller is accepted",
                env_prefix)
    return tokens
