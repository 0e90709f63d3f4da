"""Loading LLaVA-NeXT checkpoints and the CLIP text tower, by local path or hub id.

One code path loads every checkpoint, the offline `tiny` preset included: a
`ModelSpec` names the LLaVA-NeXT checkpoint, the CLIP checkpoint whose text tower
scores question relevance, and the device and dtype to run on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hero_core.config import compute_config_hash, require
from hero_core.dtypes import DTYPES as ALL_DTYPES
from hero_core.dtypes import MODEL_DTYPES
from hero_core.encoder import RelevanceEncoder, TextEncoder, VisionEncoder
from hero_core.errors import ModelLoadError
from hero_core.image import PIXELS_VERSION
from hero_core.tiling import TilingSpec

DTYPES: dict[str, torch.dtype] = {name: ALL_DTYPES[name] for name in MODEL_DTYPES}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and where to run them."""

    model: str
    """LLaVA-NeXT checkpoint in Hugging Face format: a local directory or a hub id."""
    text_tower: str | None = None
    """CLIP checkpoint whose text tower scores relevance (directory or hub id); None = off."""
    device: str = dataclasses.field(default="cpu", metadata={"hash": False})
    """torch device, e.g. "cpu", "cuda", "cuda:1"."""
    dtype: str = "float32"
    """One of float32, float16, bfloat16 (bf16 is slow on most CPUs)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of both checkpoints."""
    attn_implementation: str = dataclasses.field(default="sdpa", metadata={"hash": False})
    """Attention backend of both towers: "sdpa", "eager" or "flash_attention_2"."""
    local_files_only: bool = dataclasses.field(default=False, metadata={"hash": False})
    """Never contact the hub (air-gapped machines)."""

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, f"ModelSpec.dtype must be one of {sorted(DTYPES)}")
        require(bool(self.model), "ModelSpec.model must name a checkpoint")

    def compute_hash(self) -> str:
        return compute_config_hash(self)


HUB_PRESETS: dict[str, ModelSpec] = {
    "llava-v1.6-vicuna-7b": ModelSpec(
        "llava-hf/llava-v1.6-vicuna-7b-hf", "openai/clip-vit-large-patch14-336",
        device="cuda", dtype="float16"),
    "llava-v1.6-mistral-7b": ModelSpec(
        "llava-hf/llava-v1.6-mistral-7b-hf", "openai/clip-vit-large-patch14-336",
        device="cuda", dtype="float16"),
    "llava-v1.6-vicuna-13b": ModelSpec(
        "llava-hf/llava-v1.6-vicuna-13b-hf", "openai/clip-vit-large-patch14-336",
        device="cuda", dtype="float16"),
}
TINY_PRESET = "tiny"


def resolve_spec(name: str, models_dir: Path, device: str | None = None,
                 dtype: str | None = None) -> ModelSpec:
    """A preset name (`tiny`, `llava-v1.6-vicuna-7b`, ...), a directory holding `llava/`
    and `clip/` checkpoints, a local checkpoint directory or a hub id."""
    bundle = models_dir / "tiny" if name == TINY_PRESET else Path(name)
    if (bundle / "llava").is_dir() and (bundle / "clip").is_dir():
        # A directory holding both checkpoints, as `make setup` writes for `tiny`.
        spec = ModelSpec(str(bundle / "llava"), str(bundle / "clip"), local_files_only=True)
    elif name == TINY_PRESET:
        raise ModelLoadError(f"the tiny model is not in {models_dir / 'tiny'}; run `make setup`")
    elif name in HUB_PRESETS:
        spec = HUB_PRESETS[name]
    else:
        spec = ModelSpec(name)
    if device is not None:
        spec = dataclasses.replace(spec, device=device)
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)
    return spec


@dataclasses.dataclass
class VLM:
    """A loaded LLaVA-NeXT model with what serving needs around it."""

    spec: ModelSpec
    model: Any
    """`LlavaNextForConditionalGeneration`."""
    tokenizer: Any
    tiling: TilingSpec
    text_encoder: RelevanceEncoder | None
    """Scores questions against tiles (CLIP's text tower), or None."""
    visual_projection: nn.Module | None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector  # type: ignore[no-any-return]

    @property
    def image_newline(self) -> torch.Tensor:
        return self.model.model.image_newline  # type: ignore[no-any-return]

    @property
    def feature_dim(self) -> int:
        """Width of the pre-projector features that travel and are cached (1024 for CLIP-L)."""
        return int(self.config.vision_config.hidden_size)

    def vision_encoder(self) -> VisionEncoder:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelLoadError("multi-layer vision_feature_layer is not supported")
        return VisionEncoder(self.model.model.vision_tower, layer, self.visual_projection)

    def encoder_fingerprint(self) -> str:
        """Identifies everything that determines the encoded features of an image."""
        return encoder_fingerprint(self.spec, self.config.vision_feature_layer, self.tiling)


def encoder_fingerprint(spec: ModelSpec, feature_layer: Any, tiling: TilingSpec) -> str:
    """Fingerprint of checkpoint, dtype, feature layer, tiling and image decoding (cache
    keys use it)."""
    blob = f"{spec.compute_hash()}|{feature_layer}|{tiling}|pixels-v{PIXELS_VERSION}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


PARTS = ("all", "vision", "language", "embeddings")


def load_vlm(spec: ModelSpec, parts: str = "all") -> VLM:
    """Load a LLaVA-NeXT checkpoint and (optionally) the CLIP text tower for `spec`.

    `parts="vision"` keeps the vision tower and the text tower (what the vision
    service runs); `parts="language"` keeps projector, image_newline and the LLM
    (what the language service runs); `parts="embeddings"` keeps projector,
    image_newline and the LLM's embedding table only (what the language service needs
    beside an engine that loads the LLM itself, such as vLLM). What is not kept is
    freed before the model moves to its device.
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}")
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    common = _hub_kwargs(spec)
    model: Any
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(
            spec.model, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation,
            **common)
        tokenizer = AutoTokenizer.from_pretrained(spec.model, **common)
        tiling = load_tiling(spec, int(model.config.vision_config.patch_size))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load LLaVA-NeXT checkpoint {spec.model!r}: {exc}") from exc
    if model.config.vision_feature_select_strategy != "default":
        raise ModelLoadError("only vision_feature_select_strategy='default' (CLS dropped) "
                             "is supported")
    if parts == "vision":
        del model.model.language_model, model.lm_head
    elif parts in ("language", "embeddings"):
        del model.model.vision_tower
    if parts == "embeddings":
        model.model.language_model.layers = nn.ModuleList()
        del model.lm_head
    model.to(spec.device).eval()
    text_encoder, visual_projection = (None, None) if parts == "language" \
        else load_text_tower(spec)
    return VLM(spec, model, tokenizer, tiling, text_encoder, visual_projection)


def load_tiling(spec: ModelSpec, patch_size: int) -> TilingSpec:
    """The tiling of a checkpoint, from its image processor config."""
    from transformers import LlavaNextImageProcessorPil

    proc = LlavaNextImageProcessorPil.from_pretrained(spec.model, **_hub_kwargs(spec))
    crop = proc.crop_size["height"] if proc.crop_size else proc.size["shortest_edge"]
    return TilingSpec(
        grid_pinpoints=tuple((int(h), int(w)) for h, w in proc.image_grid_pinpoints),
        crop_size=int(crop), patch_size=patch_size,
        image_mean=_triple(proc.image_mean), image_std=_triple(proc.image_std),
        resample=int(proc.resample), rescale_factor=float(proc.rescale_factor),
    )


def load_text_tower(spec: ModelSpec) -> tuple[TextEncoder | None, nn.Module | None]:
    """The CLIP text tower, text projection and visual projection of `spec.text_tower`.

    The CLIP vision tower is dropped after loading: LLaVA's own tower encodes the crops
    and only CLIP's `visual_projection` maps its pooled CLS into the joint space.
    """
    if spec.text_tower is None:
        return None, None
    from transformers import AutoTokenizer, CLIPModel

    common = _hub_kwargs(spec)
    try:
        clip = CLIPModel.from_pretrained(spec.text_tower, dtype=DTYPES[spec.dtype],
                                         attn_implementation=spec.attn_implementation, **common)
        tokenizer = AutoTokenizer.from_pretrained(spec.text_tower, **common)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load CLIP checkpoint {spec.text_tower!r}: {exc}") from exc
    del clip.vision_model
    clip.to(spec.device).eval()  # type: ignore[arg-type]
    return TextEncoder(clip.text_model, clip.text_projection, tokenizer), clip.visual_projection


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"local_files_only": spec.local_files_only}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    return kwargs
