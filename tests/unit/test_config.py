"""Both services load their settings one way: defaults < YAML (or Serve args) < env."""

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from services.language.config import LanguageConfig
from services.vision.__main__ import NodeSettings, resolve_config
from services.vision.config import VisionConfig
from services.vision.runner import SERVE_CONFIG, ServeApp


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("HERO_LANGUAGE_", "HERO_VISION_")):
            monkeypatch.delenv(name)


def test_yaml_then_environment_override_defaults(tmp_path, monkeypatch):
    path = tmp_path / "language.yaml"
    path.write_text("port: 6000\nmax_queue: 3\nlimits:\n  max_new_tokens: 100\n")
    for name, value in {"HERO_LANGUAGE_PORT": "7000",
                        "HERO_LANGUAGE_LIMITS__MAX_PROMPT_TOKENS": "99",
                        "HERO_LANGUAGE_ACCEPTED_DTYPES": '["float16", "int8"]',
                        "UNRELATED": "x"}.items():
        monkeypatch.setenv(name, value)
    config = LanguageConfig.load(path)
    assert config.port == 7000  # env beats YAML
    assert config.max_queue == 3  # YAML beats default
    # a nested value from the environment merges with the file's, key by key
    assert config.limits.max_new_tokens == 100 and config.limits.max_prompt_tokens == 99
    assert config.accepted_dtypes == ["float16", "int8"]
    assert config.max_concurrency == 1  # default


def test_strings_from_the_environment_stay_strings(monkeypatch):
    """`no`, `on`, `1e3` are text where the field is text (YAML parsing would turn them
    into booleans and numbers)."""
    monkeypatch.setenv("HERO_LANGUAGE_MODEL", "no")
    monkeypatch.setenv("HERO_VISION_DEFAULT_METHOD", "hero")
    monkeypatch.setenv("HERO_VISION_LANGUAGE_TARGET", "on")
    assert LanguageConfig.load().model == "no"
    assert VisionConfig.load().language_target == "on"


def test_secrets_come_from_the_environment_and_are_never_shown(monkeypatch):
    monkeypatch.setenv("HERO_LANGUAGE_API_TOKENS", "tok-a,tok-b")
    monkeypatch.setenv("HERO_VISION_CACHE__PASSWORD", "redis-pass")
    monkeypatch.setenv("HERO_VISION_LANGUAGE_TOKEN", "tok-a")
    language, vision = LanguageConfig.load(), VisionConfig.load(values={"model": "tiny"})
    assert language.api_tokens is not None
    assert language.api_tokens.get_secret_value() == "tok-a,tok-b"
    assert vision.cache.password is not None
    assert vision.cache.password.get_secret_value() == "redis-pass"
    for shown in (repr(language), str(language), language.model_dump_json(), repr(vision),
                  vision.model_dump_json()):
        assert "tok-a" not in shown and "redis-pass" not in shown


def test_serve_args_are_loaded_like_a_yaml_file(monkeypatch):
    """The vision app's args (Serve config) sit where the language service's YAML does:
    above the defaults, below the process's environment."""
    monkeypatch.setenv("HERO_VISION_CACHE__TTL_S", "60")
    config = VisionConfig.load(values={"cache": {"url": "memory://", "ttl_s": 5},
                                       "max_image_bytes": 1 << 20})
    assert config.cache.url == "memory://" and config.cache.ttl_s == 60
    assert config.max_image_bytes == 1 << 20
    assert config.max_request_bytes == (1 << 20) + 4 * config.max_prompt_chars + (64 << 10)
    # the HTTP API's body: the image as base64, the prompt JSON-escaped, 64 KiB more
    assert config.max_http_body_bytes == \
        4 * -(-(1 << 20) // 3) + 6 * config.max_prompt_chars + (64 << 10)


def test_the_node_runner_reads_its_ports_and_checks_the_args(monkeypatch):
    monkeypatch.setenv("HERO_VISION_GRPC_PORT", "9100")
    monkeypatch.setenv("HERO_VISION_METRICS_PORT", "9200")
    node = NodeSettings()
    assert (node.grpc_port, node.metrics_port) == (9100, 9200)
    config = resolve_config(SERVE_CONFIG, node)
    assert config["grpc_options"]["port"] == 9100
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}  # the file's
    monkeypatch.setenv("HERO_VISION_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("HERO_VISION_HTTP_PORT", "8100")
    published = resolve_config(SERVE_CONFIG, NodeSettings())
    assert published["http_options"] == {"host": "0.0.0.0", "port": 8100}
    # the args are checked with the environment over them before Ray starts
    monkeypatch.setenv("HERO_VISION_DEFAULT_RETENTION", "2")
    with pytest.raises(ValidationError, match="default_retention"):
        ServeApp(config).start()


def test_unknown_keys_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "language.yaml"
    path.write_text("prot: 6000\n")
    with pytest.raises(ValidationError, match="prot"):
        LanguageConfig.load(path)
    with pytest.raises(ValidationError, match="bogus"):
        VisionConfig.load(values={"cache": {"bogus": 1}})
    monkeypatch.setenv("HERO_LANGUAGE_LIMITS__MAX_NEW_TOKEN", "5")  # a nested typo
    with pytest.raises(ValidationError, match="max_new_token"):
        LanguageConfig.load()


def test_out_of_range_and_malformed_values_are_refused(monkeypatch):
    monkeypatch.setenv("HERO_LANGUAGE_MAX_CONCURRENCY", "0")
    with pytest.raises(ValidationError, match="max_concurrency"):
        LanguageConfig.load()
    monkeypatch.setenv("HERO_LANGUAGE_MAX_CONCURRENCY", "1")
    monkeypatch.setenv("HERO_LANGUAGE_DTYPE", "int4")
    with pytest.raises(ValidationError, match="dtype"):
        LanguageConfig.load()
    monkeypatch.delenv("HERO_LANGUAGE_DTYPE")
    monkeypatch.setenv("HERO_LANGUAGE_ACCEPTED_DTYPES", "[float16")
    with pytest.raises(SettingsError, match="accepted_dtypes"):
        LanguageConfig.load()


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "language.yaml"
    path.write_text("- port\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        LanguageConfig.load(path)


def test_limits_have_one_definition():
    from hero_core.config import DEFAULT_LIMITS

    language, vision = LanguageConfig.model_validate({}), VisionConfig.model_validate({})
    assert vision.max_image_bytes == DEFAULT_LIMITS.max_image_bytes
    assert vision.max_image_pixels == DEFAULT_LIMITS.max_image_pixels
    assert vision.max_prompt_chars == language.limits.max_prompt_chars \
        == DEFAULT_LIMITS.max_prompt_chars
