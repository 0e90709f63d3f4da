"""A user clones this repository alone: nothing in it may need a folder beside it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from hero_core.methods import hero
from tests.conftest import ROOT

SKIP_DIRS = {".git", ".venv", ".venv-scan", ".venv-aiperf", "build", "models", "out", "__pycache__",
             ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "certs"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".cfg", ".txt", ".proto", ""}
# A relative path that climbs folders, and code that climbs above the checkout's root.
CLIMB = re.compile(r"(?:\.\./)+[\w.-]+(?:/[\w.-]+)*")
ABOVE_ROOT = re.compile(r"\bROOT\.parent\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def project_files() -> list[Path]:
    """The repository's own files: what git tracks or would add (nothing it ignores, such
    as virtual environments and build outputs); without git, a walk that skips those."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    candidates = ([ROOT / line for line in listed.stdout.splitlines()]
                  if listed.returncode == 0 and listed.stdout else list(ROOT.rglob("*")))
    found = []
    for path in candidates:
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
            found.append(path)
    return found


def test_no_file_refers_to_a_folder_beside_the_checkout():
    """Every `../` path names something that exists inside the repository (seen from the
    file's folder or from the root), and no code reaches above the root."""
    offenders = []
    for path in project_files():
        text = path.read_text(errors="replace")
        for match in CLIMB.finditer(text):
            target = match.group(0).rstrip(".")
            inside = [(base / target).resolve() for base in (path.parent, ROOT)]
            if not any(t.is_relative_to(ROOT) and t.exists() for t in inside):
                offenders.append(f"{path.relative_to(ROOT)}: {target}")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}"
                      for m in ABOVE_ROOT.finditer(text) if path != Path(__file__)]
    assert not offenders, f"files that need something outside the repository: {offenders}"


@pytest.mark.parametrize("doc", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("**/*.md")
                                       if not set(p.relative_to(ROOT).parts) & SKIP_DIRS))
def test_relative_links_in_docs_resolve_inside_the_repository(doc):
    path = ROOT / doc
    for target in MARKDOWN_LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"


def test_carried_schemas_have_their_licence_and_source():
    schemas = sorted(p for p in (ROOT / "tests" / "schemas").iterdir() if p.is_dir())
    assert {p.name for p in schemas} >= {"kuberay", "compose"}
    for folder in schemas:
        assert "Apache License" in (folder / "LICENSE").read_text()
        assert (folder / "SOURCE.md").read_text().strip()


def test_method_description_is_in_the_repository():
    method = (ROOT / "docs" / "METHOD.md").read_text()
    assert "docs/METHOD.md" in (hero.__doc__ or "")
    for field in dataclasses.fields(hero.HeroConfig):
        assert f"`{field.name}`" in method, f"HeroConfig.{field.name} is not in docs/METHOD.md"
