"""Every generated protobuf module imports, and the contract holds its key shapes."""

import importlib
from pathlib import Path

import hero

from services.common.codec import MAX_CHUNK_BYTES


def test_every_generated_module_imports():
    root = Path(next(iter(hero.__path__)))
    generated = [".".join(("hero", *p.relative_to(root).with_suffix("").parts))
                 for p in root.rglob("*_pb2*.py")]
    assert all(p.with_suffix(".pyi").exists() for p in root.rglob("*_pb2.py")), "stubs missing"
    assert {"hero.common.v1.tensor_pb2", "hero.language.v1.language_pb2",
            "hero.language.v1.language_pb2_grpc", "hero.vision.v1.vision_pb2",
            "hero.vision.v1.vision_pb2_grpc"} <= set(generated)
    for name in generated:
        importlib.import_module(name)


def test_services_are_declared_in_versioned_packages():
    from hero.language.v1 import language_pb2
    from hero.vision.v1 import vision_pb2

    assert language_pb2.DESCRIPTOR.package == "hero.language.v1"
    assert "Generate" in language_pb2.DESCRIPTOR.services_by_name["LanguageService"].methods_by_name
    assert {"Generate", "Prune"} <= set(
        vision_pb2.DESCRIPTOR.services_by_name["VisionService"].methods_by_name)


def test_every_message_and_field_is_commented():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "protos"
    for proto in root.rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = stripped.startswith(("message ", "enum ", "rpc ", "service ")) or (
                stripped.endswith(";") and "=" in stripped and not stripped.startswith(
                    ("syntax", "package", "option", "import")))
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} {stripped}"


def test_chunk_limit_is_one_mebibyte():
    assert MAX_CHUNK_BYTES == 1 << 20


def test_an_unset_seed_stays_unset_across_the_wire_and_zero_is_a_seed():
    from hero.common.v1 import tensor_pb2

    from services.language.config import LimitsConfig
    from services.language.server import check_params
    from services.sdk.language import make_header
    from services.sdk.vision import generate_request

    def received(params):
        return check_params(tensor_pb2.GenerationParams.FromString(params.SerializeToString()),
                            LimitsConfig()).seed

    def vision(**seed):
        return generate_request(b"png", "q", max_new_tokens=4, **seed).params

    def header(**seed):  # what the vision service sends on: the request's params as they are
        return make_header("q", None, "r", vision(**seed)).params

    assert received(header()) is None and received(vision()) is None
    assert received(header(seed=0)) == 0 and received(vision(seed=0)) == 0
    assert received(header(seed=2**64 - 1)) == 2**64 - 1
