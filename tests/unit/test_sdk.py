"""The Python client's own behaviour: typed errors, and target and token from the
environment."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sdk import errors
from services.sdk.vision import VisionClient, connection


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(("code", "family", "retryable"), [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequest, False),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound, False),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded, True),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded, False),
    (grpc.StatusCode.CANCELLED, errors.Cancelled, False),
    (grpc.StatusCode.INTERNAL, errors.ServerError, False),
    (grpc.StatusCode.UNIMPLEMENTED, errors.ServerError, False),
])
def test_every_status_becomes_a_typed_error_that_is_still_an_rpc_error(code, family,
                                                                          retryable):
    typed = errors.api_error(FakeRpcError(code, "what to change"))
    assert type(typed) is family and isinstance(typed, grpc.RpcError)
    assert typed.code() == code and typed.details() == "what to change"
    assert typed.retryable is retryable and code.name in str(typed)


def test_target_and_token_come_from_the_environment_unless_given(monkeypatch):
    monkeypatch.delenv("HERO_TARGET", raising=False)
    monkeypatch.delenv("HERO_API_TOKEN", raising=False)
    assert connection(None, None) == ("127.0.0.1:9000", None)
    monkeypatch.setenv("HERO_TARGET", "vision.example:443")
    monkeypatch.setenv("HERO_API_TOKEN", "t0ken")
    assert connection(None, None) == ("vision.example:443", "t0ken")
    assert connection("other:9000", "") == ("other:9000", None)  # "" = no token
    with VisionClient() as client:
        assert client.metadata == [("authorization", "Bearer t0ken")]


def test_a_failed_call_raises_the_typed_error(monkeypatch):
    monkeypatch.delenv("HERO_API_TOKEN", raising=False)
    with VisionClient("127.0.0.1:1") as client, \
            pytest.raises(errors.Unavailable) as info:  # nothing listens there
        list(client.generate(b"\x89PNG", "what?", timeout=5))
    assert info.value.retryable


@given(st.floats(min_value=0, allow_infinity=True) | st.just(float("nan")))
def test_the_deadline_header_the_sdk_sends_is_one_the_service_accepts(timeout):
    """Any timeout becomes whole milliseconds in 1..MAX_TIMEOUT_MS (a day and more: the
    most the service accepts), never a value the service refuses."""
    from services.common.params import MAX_TIMEOUT_MS, timeout_ms_of
    from services.sdk.vision import call_metadata

    metadata = call_metadata([("authorization", "Bearer t")], timeout)
    assert metadata is not None and metadata[0] == ("authorization", "Bearer t")
    sent = timeout_ms_of(metadata)
    assert sent is not None and 1 <= sent <= MAX_TIMEOUT_MS
    if timeout * 1000 < MAX_TIMEOUT_MS:  # False for nan and inf
        assert sent == max(1, int(timeout * 1000))
