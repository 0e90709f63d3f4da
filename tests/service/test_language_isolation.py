"""One client's parameters or features never end another client's call (real grpc.aio
server on a loopback port)."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from hero.common.v1 import tensor_pb2 as common_pb2

from tests.service.conftest import language_server
from tests.service.test_language import QUESTION, requests, rpc_error, wait_until


@pytest.fixture(scope="module")
def batched(language_model):
    srv = language_server(language_model)
    yield srv
    srv.stop()


def outcome(srv, reqs, started=None):
    """(status code, token ids, usage) of one Generate call; `started` is set at its
    first delta."""
    tokens, usage = [], None
    try:
        for response in srv.stub().Generate(iter(reqs), timeout=300):
            if response.WhichOneof("part") == "delta":
                tokens += response.delta.token_ids
                if started is not None:
                    started.append(True)
            else:
                usage = response.usage
    except grpc.RpcError as error:
        return error.code(), tokens, error.details()
    return grpc.StatusCode.OK, tokens, usage


def test_tiny_temperatures_beside_greedy_calls_end_no_call(batched, astronaut_tokens):
    """Two greedy calls decode 400 tokens; ten calls at temperatures 1.5e-38..3e-38 (which
    overflow logits / temperature) join them. Every call is answered in full."""
    greedy = requests(astronaut_tokens, max_new_tokens=400, ignore_eos=True)
    temperatures = torch.linspace(1.5e-38, 3e-38, 10).tolist()
    tiny = [requests(astronaut_tokens, prompt=f"Question {i}?", max_new_tokens=200,
                     ignore_eos=True, temperature=t, seed=i)
            for i, t in enumerate(temperatures)]
    started: list[bool] = []
    with ThreadPoolExecutor(12) as pool:
        first = [pool.submit(outcome, batched, greedy, started) for _ in range(2)]
        wait_until(lambda: len(started) >= 2, timeout=60)
        rest = [pool.submit(outcome, batched, reqs) for reqs in tiny]
        results = [f.result() for f in first + rest]
    for (code, tokens, usage), want in zip(results, [400] * 2 + [200] * 10, strict=True):
        assert code == grpc.StatusCode.OK, usage
        assert len(tokens) == usage.completion_tokens == want
        assert usage.finish_reason == common_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_the_smallest_temperature_answers_as_greedy(language_model, astronaut_tokens, engine):
    srv = language_server(language_model, engine=engine)
    try:
        code, tokens, _ = outcome(srv, requests(astronaut_tokens, max_new_tokens=40,
                                                ignore_eos=True, temperature=1.4e-45))
        _, greedy, _ = outcome(srv, requests(astronaut_tokens, max_new_tokens=40,
                                             ignore_eos=True))
    finally:
        srv.stop()
    assert code == grpc.StatusCode.OK
    assert tokens == greedy and len(tokens) == 40


def _spoil(packed, value):
    features = packed.features.clone()
    features[3, 5] = value
    return packed.__class__(**{**packed.__dict__, "features": features})


def _nan_scale(reqs):
    scales = bytearray(reqs[1].tokens.features.row_scales)
    scales[8:12] = struct.pack("<f", float("nan"))
    reqs[1].tokens.features.row_scales = bytes(scales)
    return reqs


@pytest.mark.parametrize(("make", "token"), [
    (lambda p: requests(_spoil(p, float("nan")), dtype="float32"), 3),
    (lambda p: requests(_spoil(p, float("inf")), dtype="float16"), 3),
    (lambda p: requests(_spoil(p, 1e6), dtype="float16"), 3),  # inf once rounded to float16
    (lambda p: requests(_spoil(p, float("-inf")), dtype="bfloat16"), 3),
    (lambda p: _nan_scale(requests(p, dtype="int8")), 2),
])
def test_features_holding_nan_or_infinity_are_refused_at_the_door(batched, astronaut_tokens,
                                                                  make, token):
    error = rpc_error(batched, make(astronaut_tokens))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"finite numbers; token {token} of 320 holds NaN or infinity" in error.details()


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_features_too_large_to_compute_with_end_their_call_alone(language_model,
                                                                 astronaut_tokens, engine):
    """Finite features pass the door; float32 1e38 overflows the projector, so that call
    alone ends INVALID_ARGUMENT while a greedy call beside it is answered in full."""
    huge = astronaut_tokens.__class__(**{**astronaut_tokens.__dict__, "features":
                                         torch.full_like(astronaut_tokens.features, 1e38)})
    srv = language_server(language_model, engine=engine, max_concurrency=2)
    started: list[bool] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(outcome, srv, requests(astronaut_tokens, max_new_tokens=200,
                                                      ignore_eos=True), started)
            wait_until(lambda: len(started) >= 1, timeout=60)
            bad = outcome(srv, requests(huge, QUESTION, max_new_tokens=20))
            code, tokens, usage = good.result()
    finally:
        srv.stop()
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite after 0 generated token(s)" in bad[2]
    assert code == grpc.StatusCode.OK and len(tokens) == usage.completion_tokens == 200
