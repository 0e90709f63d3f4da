import pytest
from pydantic import ValidationError

from services.common.config import load_config
from services.language.config import ENV_PREFIX, LanguageConfig


def test_yaml_then_environment_override_defaults(tmp_path):
    path = tmp_path / "language.yaml"
    path.write_text("port: 6000\nmax_queue: 3\nlimits:\n  max_new_tokens: 100\n")
    env = {"HERO_LANGUAGE_PORT": "7000", "HERO_LANGUAGE_LIMITS__MAX_PROMPT_TOKENS": "99",
           "HERO_LANGUAGE_ACCEPTED_DTYPES": "[float16, int8]", "UNRELATED": "x"}
    config = load_config(LanguageConfig, path, ENV_PREFIX, env)
    assert config.port == 7000  # env beats YAML
    assert config.max_queue == 3  # YAML beats default
    assert config.limits.max_new_tokens == 100 and config.limits.max_prompt_tokens == 99
    assert config.accepted_dtypes == ["float16", "int8"]
    assert config.max_concurrency == 1  # default


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "language.yaml"
    path.write_text("prot: 6000\n")
    with pytest.raises(ValidationError, match="prot"):
        load_config(LanguageConfig, path, ENV_PREFIX, {})


def test_out_of_range_values_are_refused():
    with pytest.raises(ValidationError):
        load_config(LanguageConfig, None, ENV_PREFIX, {"HERO_LANGUAGE_MAX_CONCURRENCY": "0"})
    with pytest.raises(ValidationError):
        load_config(LanguageConfig, None, ENV_PREFIX, {"HERO_LANGUAGE_DTYPE": "int4"})
