"""The whole system: a real Redis, a real language service process, a real local
Ray Serve app. Runs inside a private network namespace (`.ci/isolated`, as
`make test` does), because Ray binds some ports on all interfaces."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.conftest import MODELS_DIR, only_loopback


@pytest.fixture(scope="session", autouse=True)
def isolated_network():
    assert only_loopback(), ("integration tests start Ray, which binds ports on every "
                             "interface: run them with `make test` (.ci/isolated)")


API_TOKEN = "integration-test-token"


@pytest.fixture(scope="session")
def system(tiny_dir):
    from services.local import LocalSystem, free_port

    # float32 end to end, so the `full` method can be compared with stock transformers.
    system = LocalSystem("tiny", MODELS_DIR, grpc_port=free_port(), num_cpus=2,
                         vision_args={"cache": {"dtype": "float32"},
                                      "batch": {"batch_wait_timeout_s": 0.05}},
                         # answers long enough to cancel or time out while they stream;
                         # a small batch and queue, so a burst can fill them
                         language_env={"HERO_LANGUAGE_LIMITS__MAX_NEW_TOKENS": "4096",
                                       "HERO_LANGUAGE_BATCHING__MAX_BATCH_SIZE": "2",
                                       "HERO_LANGUAGE_MAX_QUEUE": "4",
                                       # internal, on 127.0.0.1: no token between them
                                       "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED": "true"},
                         # the public API requires a bearer token; it reaches Ray's
                         # processes, not this one's environment
                         vision_env={"HERO_VISION_API_TOKENS":
                                     f"some-other-token,{API_TOKEN}"})
    system.start()
    yield system
    system.stop()


@pytest.fixture(scope="session")
def client(system):
    from services.sdk.vision import VisionClient

    with VisionClient(system.target, token=API_TOKEN) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


STOPS_THE_SYSTEM = "test_system_shutdown.py"
"""The tests that stop the session's system run after every other integration test."""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name == STOPS_THE_SYSTEM)
