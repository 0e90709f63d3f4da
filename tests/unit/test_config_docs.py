"""Each service's configuration table (its README's "Configuration" section) lists exactly
the fields of its settings model, each with the model's default: a field added, renamed
or given a new default without its row fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from services.language.config import LanguageConfig
from services.vision.config import VisionConfig

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| ((?:`[\w.]+`(?:, )?)+) \| (.+?) \| .+ \|$")


def model_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a settings model (nested models' fields as `outer.inner`) and
    its default, as the table writes it."""
    found: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            found.update(model_fields(type(default), f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = plain(default)
    return found


def plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    return value


def table(readme: Path) -> dict[str, Any]:
    """Key -> default of the rows in the README's Configuration section."""
    text = readme.read_text()
    section = text[text.index("## Configuration"):]
    section = section[:section.index("\n## ", 1)]
    rows: dict[str, Any] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            for key in re.findall(r"`([\w.]+)`", match.group(1)):
                assert key not in rows, f"{key} has two rows"
                rows[key] = documented(match.group(2))
    return rows


def documented(cell: str) -> Any:
    """A default as the table writes it: `unset` and null for None, JSON otherwise, else
    the text itself (strings are written bare)."""
    text = cell.strip().strip("`")
    if text in ("unset", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.mark.parametrize(("readme", "model"), [
    ("services/vision/README.md", VisionConfig),
    ("services/language/README.md", LanguageConfig),
])
def test_the_configuration_table_is_the_settings_model(readme, model):
    rows, fields = table(ROOT / readme), model_fields(model)
    assert sorted(rows) == sorted(fields), "rows and fields differ"
    wrong = {key: (rows[key], fields[key]) for key in fields if rows[key] != fields[key]}
    assert not wrong, f"documented default != model default: {wrong}"


def test_the_table_reader_sees_a_missing_row_and_a_wrong_default(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## Configuration\n\n| key | default | meaning |\n|---|---|---|\n"
                      "| `model` | `tiny` | x |\n| `cache.ttl_s` | 5 | y |\n\n## Next\n")
    assert table(readme) == {"model": "tiny", "cache.ttl_s": 5}
    fields = model_fields(VisionConfig)
    assert fields["cache.ttl_s"] == 86400.0 and "cache.url" in fields
