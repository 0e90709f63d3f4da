"""No request within every limit meets a transport limit: the language service's receive
limit is derived from its request limits (`LimitsConfig.max_message_bytes`), and the
public request bound of Serve's proxy from the vision service's."""

from __future__ import annotations

import grpc
import pytest
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2
from hero.vision.v1 import vision_pb2

from services.common.codec import MAX_CHUNK_BYTES
from services.common.params import MAX_REQUEST_ID_CHARS, MAX_ROLE_CHARS
from services.language.config import LimitsConfig
from services.vision.door import MAX_METHOD_CHARS
from tests.service.conftest import language_server

WIDE = "\U0010ffff"  # four bytes in UTF-8: the most any character takes
U32, U64 = 2 ** 32 - 1, 2 ** 64 - 1


def widest_chat(chars: int, messages: int) -> list[common_pb2.ChatMessage]:
    """`messages` turns with the longest roles, sharing `chars` characters of content."""
    share = [chars // messages + (i < chars % messages) for i in range(messages)]
    return [common_pb2.ChatMessage(role=WIDE * MAX_ROLE_CHARS, content=WIDE * n) for n in share]


def widest_params(max_new_tokens: int, stop_strings: int, stop_chars: int
                  ) -> common_pb2.GenerationParams:
    return common_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=2.0,
                                       top_p=1.0, seed=U64, ignore_eos=True,
                                       stop=[WIDE * stop_chars] * stop_strings)


def largest_header(limits: LimitsConfig) -> language_pb2.GenerateHeader:
    header = language_pb2.GenerateHeader(
        request_id="~" * MAX_REQUEST_ID_CHARS,
        params=widest_params(limits.max_new_tokens, limits.max_stop_strings,
                             limits.max_stop_chars))
    header.chat.messages.extend(widest_chat(limits.max_prompt_chars, limits.max_messages))
    return header


def largest_tokens(limits: LimitsConfig, feature_dim: int) -> language_pb2.VisualTokens:
    n = limits.max_visual_tokens
    most = [U32] * n
    layout = common_pb2.TokenLayout(image_height=U32, image_width=U32, grid_rows=U32,
                                    grid_cols=U32, tokens_per_side=U32, full_tokens=U32,
                                    crop=most, row=most, col=most, newline_after=most)
    features = common_pb2.TensorHeader(dtype=common_pb2.DTYPE_INT8, shape=[n, feature_dim],
                                       total_bytes=n * feature_dim, num_chunks=1, crc32=U32,
                                       row_scales=b"\xff" * (4 * n))
    return language_pb2.VisualTokens(layout=layout, features=features)


def largest_messages(limits: LimitsConfig, feature_dim: int
                     ) -> list[language_pb2.GenerateRequest]:
    """A Generate stream whose every message is as large as a request within `limits`
    can make it: header, visual tokens, one full chunk."""
    chunk = common_pb2.TensorChunk(index=U32, data=b"\xff" * MAX_CHUNK_BYTES)
    return [language_pb2.GenerateRequest(header=largest_header(limits)),
            language_pb2.GenerateRequest(tokens=largest_tokens(limits, feature_dim)),
            language_pb2.GenerateRequest(chunk=chunk)]


@pytest.mark.parametrize("overrides", [{}, {"max_prompt_chars": 2_000_000},
                                       {"max_visual_tokens": 200_000, "max_messages": 500},
                                       {"max_stop_strings": 64, "max_stop_chars": 4096}])
def test_every_message_within_the_limits_fits_the_receive_limit(overrides):
    limits = LimitsConfig(**overrides)
    sizes = [m.ByteSize() for m in largest_messages(limits, feature_dim=4096)]
    assert max(sizes) <= limits.max_message_bytes, (sizes, limits.max_message_bytes)
    assert limits.max_message_bytes < 1.25 * max(sizes) + (64 << 10)  # a bound, not a guess


def test_the_largest_valid_request_passes_the_language_services_receive_limit(
        language_model):
    """With prompts of up to 2,000,000 characters (8 MB of UTF-8) the largest header, the
    largest visual tokens and a full chunk all reach the service, which answers about
    their content, never RESOURCE_EXHAUSTED at the transport."""
    limits = {"max_prompt_chars": 2_000_000}
    server = language_server(language_model, limits=limits)
    try:
        config = server.servicer.config.limits
        messages = largest_messages(config, server.servicer.engine.info.feature_dim)
        assert messages[0].ByteSize() > 4 << 20  # above grpc's default receive limit
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as validate:
            stub.Validate(messages[0].header, timeout=120)
        assert validate.value.code() == grpc.StatusCode.INVALID_ARGUMENT, \
            validate.value.details()
        with pytest.raises(grpc.RpcError) as generate:
            list(stub.Generate(iter(messages), timeout=120))
        assert generate.value.code() == grpc.StatusCode.INVALID_ARGUMENT, \
            generate.value.details()
    finally:
        server.stop()


def test_the_largest_valid_public_request_fits_the_proxy_bound():
    from services.vision.config import VisionConfig

    config = VisionConfig(max_image_bytes=1 << 20)
    request = vision_pb2.GenerateRequest(
        request_id="~" * MAX_REQUEST_ID_CHARS,
        image=vision_pb2.ImageInput(data=b"\xff" * config.max_image_bytes),
        prune=vision_pb2.PruneOptions(method=WIDE * MAX_METHOD_CHARS, retention=1.0),
        params=widest_params(U32, 8, 64))
    request.chat.messages.extend(widest_chat(config.max_prompt_chars, 64))
    assert request.ByteSize() <= config.max_request_bytes
