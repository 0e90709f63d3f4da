"""The language service against a real grpc.aio server on a free loopback port."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2

from services.sdk.language import SyncLanguageClient, generate_requests, make_header
from tests.service.conftest import ServerThread, free_port, language_config, language_server

QUESTION = "What is the astronaut holding?"


def tokens_of(parts):
    return [t for p in parts if isinstance(p, common_pb2.TextDelta) for t in p.token_ids]


def requests(packed, prompt=QUESTION, dtype="float32", chunk_bytes=1 << 20, **params):
    settings = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": ()}
    settings.update(params)
    header = make_header(prompt, None, "test", common_pb2.GenerationParams(**settings))
    return list(generate_requests(packed, header, dtype, chunk_bytes))


def call(server, reqs, timeout=60):
    return list(server.stub().Generate(iter(reqs), timeout=timeout))


def rpc_error(server, reqs, timeout=60) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(server, reqs, timeout)
    return info.value


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_equivalence_streamed_tokens_match_in_process_generation(language_model, astronaut_tokens,
                                                                 reference, vlm, engine):
    srv = language_server(language_model, engine=engine)
    client = SyncLanguageClient(f"127.0.0.1:{srv.port}")
    try:
        parts = client.generate(astronaut_tokens, QUESTION, max_new_tokens=24, dtype="float32")
    finally:
        client.close()
        srv.stop()
    expected = reference(astronaut_tokens, QUESTION, 24)
    assert tokens_of(parts) == expected
    text = "".join(p.text for p in parts if isinstance(p, common_pb2.TextDelta))
    assert text == vlm.tokenizer.decode(expected, skip_special_tokens=True)
    usage = parts[-1]
    assert isinstance(usage, common_pb2.Usage)
    assert usage.visual_tokens == astronaut_tokens.num_embeddings
    assert usage.completion_tokens == len(expected)
    assert usage.ttft_ms >= usage.prefill_ms > 0
    assert usage.prompt_tokens > usage.visual_tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_equivalence_compact_dtypes_match_generation_on_the_same_rounded_tokens(
        server, astronaut_tokens, reference, dtype):
    from services.common.codec import DTYPE_NAMES, ChunkAssembler, encode_tensor

    header, chunks = encode_tensor(astronaut_tokens.features, DTYPE_NAMES[dtype])
    assembler = ChunkAssembler(header)
    for chunk in chunks:
        assembler.add(chunk)
    rounded = astronaut_tokens.__class__(**{**astronaut_tokens.__dict__,
                                            "features": assembler.tensor().float()})
    parts = [getattr(r, r.WhichOneof("part")) for r in
             call(server, requests(astronaut_tokens, dtype=dtype, max_new_tokens=12))]
    assert tokens_of(parts) == reference(rounded, QUESTION, 12)


def test_many_small_chunks_give_the_same_answer(server, astronaut_tokens):
    big = call(server, requests(astronaut_tokens))
    small = call(server, requests(astronaut_tokens, chunk_bytes=4096))
    # the same tokens (where coalescing cuts them into messages depends on timing)
    assert [t for r in big[:-1] for t in r.delta.token_ids] == \
        [t for r in small[:-1] for t in r.delta.token_ids]
    assert len(requests(astronaut_tokens, chunk_bytes=4096)) > 20


def test_wire_bytes_are_pre_projector_rows(astronaut_tokens):
    reqs = requests(astronaut_tokens, dtype="float16")
    sent = sum(len(r.SerializeToString()) for r in reqs)
    assert reqs[1].tokens.features.shape == [320, 64]  # tiny tower width, not the LLM's
    assert sent < 320 * 64 * 2 + 4096


def test_stop_strings_end_generation_before_the_stop(server, astronaut_tokens, vlm, reference):
    full = vlm.tokenizer.decode(reference(astronaut_tokens, QUESTION, 24),
                                skip_special_tokens=True)
    stop = full[5:8]
    parts = [getattr(r, r.WhichOneof("part")) for r in
             call(server, requests(astronaut_tokens, max_new_tokens=24, stop=[stop]))]
    text = "".join(p.text for p in parts[:-1])
    assert text == full[: full.find(stop)]
    assert parts[-1].finish_reason == common_pb2.FINISH_REASON_STOP


def test_ignore_eos_generates_to_max_new_tokens(server, astronaut_tokens):
    def answer(**params):
        parts = [getattr(r, r.WhichOneof("part")) for r in
                 call(server, requests(astronaut_tokens, **{"max_new_tokens": 512, **params}))]
        return [t for p in parts[:-1] for t in p.token_ids], parts[-1]

    until_eos, usage = answer()
    assert usage.finish_reason == common_pb2.FINISH_REASON_EOS  # the tiny model ends early
    longer = min(len(until_eos) + 40, 512)
    tokens, usage = answer(ignore_eos=True, max_new_tokens=longer)
    assert usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert usage.completion_tokens == len(tokens) == longer
    assert tokens[: len(until_eos)] == until_eos


def test_sampling_with_a_seed_reproduces(server, astronaut_tokens):
    def sample(seed):
        reqs = requests(astronaut_tokens, max_new_tokens=12, temperature=1.0, top_p=0.9,
                        seed=seed)
        return [t for r in call(server, reqs)[:-1] for t in r.delta.token_ids]
    assert sample(7) == sample(7)
    assert sample(7) != sample(8) or sample(7) != sample(9)
    assert sample(0) == sample(0)  # 0 is a seed like any other


def test_sampling_without_a_seed_draws_a_fresh_answer_each_time(server, astronaut_tokens):
    def sample():
        reqs = requests(astronaut_tokens, max_new_tokens=32, temperature=1.0, seed=None,
                        ignore_eos=True)
        return [t for r in call(server, reqs)[:-1] for t in r.delta.token_ids]
    assert len({tuple(sample()) for _ in range(3)}) == 3


def test_chat_messages_are_accepted(server, astronaut_tokens):
    header = make_header(None, [("user", "Describe it."), ("assistant", "A person."),
                                ("user", QUESTION)], "chat",
                         common_pb2.GenerationParams(max_new_tokens=6))
    out = call(server, list(generate_requests(astronaut_tokens, header, "float16", 1 << 20)))
    assert out[-1].usage.completion_tokens >= 1


def _tampered(packed, **changes):
    return packed.__class__(**{**packed.__dict__, **changes})


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r, p: r[1].tokens.features.__setattr__("dtype", 0),
     "DTYPE_UNSPECIFIED is not accepted"),
    (lambda r, p: r[1].tokens.features.shape.__setitem__(1, 1024), r"\(tokens, 64\)"),
    (lambda r, p: r.pop(2), "chunk"),
    (lambda r, p: r[2].chunk.__setattr__("index", 5), "arrived where chunk 0 was expected"),
    (lambda r, p: r[2].chunk.__setattr__("data", bytes([r[2].chunk.data[0] ^ 1])
                                         + r[2].chunk.data[1:]), "CRC-32"),
    (lambda r, p: r[0].header.__setattr__("prompt", "   "), "prompt is empty"),
    (lambda r, p: r[0].header.__setattr__("prompt", "x" * 20000), "max_prompt_chars=16384"),
    (lambda r, p: r[0].header.__setattr__("prompt", "why? " * 3000), "max_prompt_tokens=2048"),
    (lambda r, p: r[0].header.params.__setattr__("max_new_tokens", 0), "max_new_tokens must be"),
    (lambda r, p: r[0].header.params.__setattr__("max_new_tokens", 100000), "1..512"),
    (lambda r, p: r[0].header.params.__setattr__("temperature", 3.0), "temperature must be"),
    (lambda r, p: r[0].header.params.__setattr__("top_p", 1.5), "top_p must be"),
    (lambda r, p: r[0].header.params.stop.extend(["a"] * 9), "stop takes at most 8"),
    (lambda r, p: r[0].header.__setattr__("prompt", "look <image> here"), "<image>"),
    (lambda r, p: r[1].tokens.layout.__setattr__("grid_rows", 1), "grid"),
    (lambda r, p: r[1].tokens.layout.__setattr__("full_tokens", 5), "full_tokens must be"),
    (lambda r, p: r[1].tokens.layout.newline_after.pop(), "newline_after"),
    (lambda r, p: r[1].tokens.layout.row.__setitem__(0, 30), "row and col must be"),
    (lambda r, p: r.insert(1, r[0]), "expected a tokens message, got header"),
])
def test_bad_input_gets_invalid_argument_with_a_message(server, astronaut_tokens, mutate,
                                                        message):
    reqs = requests(astronaut_tokens, dtype="float16")
    mutate(reqs, astronaut_tokens)
    error = rpc_error(server, reqs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert re.search(message, error.details()), error.details()


def test_a_token_in_the_padding_is_refused(server, pruner):
    from hero_core.methods import create_method
    from tests.conftest import noise_image

    packed = pruner.prune(noise_image(300, 1000), "", create_method("full"), 1.0).packed
    tile = torch.nonzero(packed.crop == 1).flatten()[0]
    row = packed.row.clone()
    row[tile] = 0  # 1x3 grid of a wide image: row 0 of a tile is letterbox padding
    error = rpc_error(server, requests(_tampered(packed, row=row)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "padding" in error.details() or "order" in error.details()


def test_model_info_describes_what_is_accepted(server):
    info = server.stub().GetModelInfo(language_pb2.GetModelInfoRequest(), timeout=10)
    assert info.feature_dim == 64 and info.tokens_per_side == 24
    assert common_pb2.DTYPE_INT8 in info.accepted_dtypes


class StalledUpload:
    """A request stream that sends its header and then waits to be released."""

    def __init__(self, reqs):
        self.reqs, self.release = reqs, threading.Event()

    def __iter__(self):
        yield self.reqs[0]
        self.release.wait(30)
        yield from self.reqs[1:]


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_over_capacity_is_refused_at_once_and_a_cancelled_call_frees_its_slot(
        language_model, astronaut_tokens, engine):
    srv = language_server(language_model, engine=engine, max_queue=0, max_concurrency=1,
                          batching={"max_batch_size": 1})
    try:
        stalled = StalledUpload(requests(astronaut_tokens))
        holder = srv.stub().Generate(iter(stalled), timeout=60)
        wait_until(lambda: srv.servicer.admission.reserved == 1)
        # the holder cannot end before its upload is released below, so a refusal that
        # comes back now did not wait for the place
        error = rpc_error(srv, requests(astronaut_tokens))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=0" in error.details()
        assert not stalled.release.is_set() and srv.servicer.admission.reserved == 1
        holder.cancel()
        stalled.release.set()
        wait_until(lambda: srv.servicer.admission.reserved == 0)
        wait_until(lambda: srv.servicer.engine.stats().running == 0)
        assert call(srv, requests(astronaut_tokens))[-1].WhichOneof("part") == "usage"
    finally:
        srv.stop()


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_cancelling_mid_generation_stops_it_and_frees_the_slot(language_model, astronaut_tokens,
                                                               engine):
    srv = language_server(language_model, engine=engine, max_queue=0,
                          batching={"max_batch_size": 1}, limits={"max_new_tokens": 4096})
    try:
        long = requests(astronaut_tokens, max_new_tokens=4000, ignore_eos=True)
        stream = srv.stub().Generate(iter(long), timeout=120)
        first = next(stream)
        assert first.WhichOneof("part") == "delta"
        stream.cancel()
        wait_until(lambda: srv.servicer.admission.reserved == 0)
        assert srv.servicer.metrics.in_flight._value.get() == 0
        wait_until(lambda: srv.servicer.engine.stats().running == 0)
        assert srv.servicer.engine.stats().kv_tokens_reserved == 0
        assert call(srv, requests(astronaut_tokens))[-1].usage.completion_tokens > 0
    finally:
        srv.stop()


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_deadline_is_honoured_and_frees_the_slot(language_model, astronaut_tokens, engine):
    srv = language_server(language_model, engine=engine, max_queue=0,
                          batching={"max_batch_size": 1}, limits={"max_new_tokens": 4096})
    try:
        start = time.monotonic()
        long = requests(astronaut_tokens, max_new_tokens=4000, ignore_eos=True)
        error = rpc_error(srv, long, timeout=0.5)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 10.0  # 4,000 tokens take far longer
        wait_until(lambda: srv.servicer.admission.reserved == 0)
        # the engine lets go of the sequence at its next step
        wait_until(lambda: srv.servicer.engine.stats().running == 0)
        assert call(srv, requests(astronaut_tokens))[-1].WhichOneof("part") == "usage"
    finally:
        srv.stop()


def test_health_is_serving_only_after_the_model_loaded(language_model):
    from services.language.app import build_engine

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return build_engine(language_config(), language_model)

    port = free_port()
    srv = ServerThread(language_config(port=port), slow_load)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = health_pb2.HealthCheckRequest(service="")
        status = health.Check(request, timeout=10, wait_for_ready=True).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        srv.ready()
        status = health.Check(health_pb2.HealthCheckRequest(
            service="hero.language.v1.LanguageService"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        srv.ready()
        srv.stop()


def test_graceful_shutdown_lets_in_flight_calls_finish(language_model, astronaut_tokens):
    srv = language_server(language_model)
    stream = srv.stub().Generate(iter(requests(astronaut_tokens, max_new_tokens=200)),
                                 timeout=120)
    first = next(stream)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 30.0})
    stopper.start()
    rest = list(stream)
    stopper.join(60)
    assert first.WhichOneof("part") == "delta"
    assert rest[-1].WhichOneof("part") == "usage"


def test_metrics_count_requests_and_errors_by_code(language_model, astronaut_tokens):
    port = free_port()
    srv = language_server(language_model, metrics_port=port,
                          batching={"kv_cache_tokens": 5000})
    try:
        usage = call(srv, requests(astronaut_tokens))[-1].usage
        bad = requests(astronaut_tokens)
        bad[0].header.params.max_new_tokens = 0
        rpc_error(srv, bad)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = body.decode()
        assert 'hero_language_requests_total{code="OK"} 1.0' in text
        assert 'hero_language_requests_total{code="INVALID_ARGUMENT"} 1.0' in text
        assert "hero_language_ttft_seconds_count 1.0" in text
        assert "hero_language_visual_tokens_sum 320.0" in text
        assert "hero_language_kv_tokens_capacity 4992.0" in text  # whole blocks of 16
        assert "hero_language_kv_tokens_reserved 0.0" in text
        assert "hero_language_running_sequences 0.0" in text
        assert "hero_language_queue_wait_seconds_count 1.0" in text
        steps = float(re.search(r"hero_language_batch_size_count (\S+)", text).group(1))
        # the first token comes from the prefill; every later one (or the end of
        # sequence) from a decode step of one sequence
        ended_by_eos = usage.finish_reason == common_pb2.FINISH_REASON_EOS
        assert steps == usage.completion_tokens - 1 + ended_by_eos
        assert f'hero_language_batch_size_bucket{{le="1.0"}} {steps:.1f}' in text
        written = usage.prompt_tokens + int(steps)  # the prompt, then one per decode step
        assert "hero_language_kv_blocks_free 312.0" in text
        assert f"hero_language_kv_blocks_cached {written // 16:.1f}" in text
        assert (f"hero_language_prefix_cache_query_tokens_total {usage.prompt_tokens:.1f}"
                in text)
        assert "hero_language_prefix_cache_hit_tokens_total 0.0" in text
        assert "hero_language_prefix_cache_hit_rate 0.0" in text
        assert "hero_language_preemptions_total 0.0" in text
    finally:
        srv.stop()


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    assert "hero.language.v1.LanguageService" in db.get_services()


def test_the_service_process_starts_reports_health_and_drains_on_sigterm(tmp_path, tiny_dir):
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.service.conftest import free_port

    port = free_port()
    config = tmp_path / "language.yaml"
    config.write_text(f"port: {port}\nmetrics_port: 0\nmodels_dir: {tiny_dir.parent}\n"
                      "allow_unauthenticated: true\n")
    proc = subprocess.Popen([sys.executable, "-m", "services.language", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
