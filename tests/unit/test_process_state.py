"""What a test or a local start may leave in the process: nothing that later tests see."""

from __future__ import annotations

import os

from services.vision.runner import environment
from tests.conftest import state_changes


def test_environment_applies_inside_the_block_and_restores_after(monkeypatch):
    monkeypatch.setenv("HERO_TEST_KEPT", "before")
    monkeypatch.delenv("HERO_TEST_ADDED", raising=False)
    monkeypatch.delenv("HERO_TEST_SET_INSIDE", raising=False)
    with environment({"HERO_TEST_KEPT": "inside", "HERO_TEST_ADDED": "inside"}):
        assert os.environ.get("HERO_TEST_KEPT") == "inside"
        assert os.environ.get("HERO_TEST_ADDED") == "inside"
        monkeypatch.setenv("HERO_TEST_SET_INSIDE", "1")  # as ray.init sets its own variables
    assert "HERO_TEST_SET_INSIDE" not in os.environ
    assert os.environ.get("HERO_TEST_KEPT") == "before"
    assert "HERO_TEST_ADDED" not in os.environ


def test_environment_restores_when_the_block_raises(monkeypatch):
    monkeypatch.delenv("HERO_TEST_ADDED", raising=False)
    try:
        with environment({"HERO_TEST_ADDED": "x"}):
            raise RuntimeError("start failed")
    except RuntimeError:
        pass
    assert "HERO_TEST_ADDED" not in os.environ


def test_state_changes_names_added_removed_and_changed_variables_and_the_cwd():
    before = ({"A": "1", "B": "2"}, "/x")
    after = ({"A": "1", "B": "3", "C": "4"}, "/y")
    assert state_changes(before, after) == ["$B", "$C", "cwd /x -> /y"]
    assert state_changes(before, before) == []
