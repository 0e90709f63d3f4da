"""Vision and text encoders: one tower pass gives everything the pruning methods need.

`VisionEncoder.encode` runs the vision tower once over a batch of crops and returns
the LLaVA features (the output of `feature_layer`, CLS dropped), the CLS-row
attention at the layers asked for, and the crops' image embeddings. Any CLS-token
ViT family registered in `TOWER_ADAPTERS` (CLIP, DINOv2) serves through a `ViTAdapter`.
`TextEncoder.embed` gives the CLIP text embedding of a question; it is one
`RelevanceEncoder`, the seam through which any question encoder aligned with a
tower's image embeddings (e.g. `hero_core.relevance.SentenceRelevance` for DINOv2)
scores tiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from hero_core.errors import ModelLoadError
from hero_core.probe import AttentionSite, ClsAttentionProbe

ANSWER_FORMAT_SUFFIXES: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
    "Answer the question with a short phrase.",
)
"""Instruction suffixes that describe the answer's form, not the image; stripped before
the question is scored against tiles."""


@dataclasses.dataclass
class EncodedCrops:
    """What one vision-tower pass over `N` crops yields."""

    features: torch.Tensor
    """`(N, T, D)` LLaVA features (output of the feature layer, CLS dropped), e.g. T=576, D=1024."""
    attention: dict[int, torch.Tensor]
    """layer -> `(N, T)` fp32 CLS-row attention summed over heads, CLS column dropped."""
    keys: dict[int, torch.Tensor]
    """layer -> `(N, T, D)` patch keys, only for the layers asked for."""
    image_embeds: torch.Tensor
    """`(N, P)` L2-normalised crop embeddings: the pooled CLS through CLIP's
    `visual_projection` (the space the text tower scores in) or, without one, the pooled
    CLS itself (good for saliency, not for relevance)."""

    def select(self, index: slice) -> EncodedCrops:
        """The crops `index` of a batch (e.g. one image's crops out of many)."""
        return EncodedCrops(
            self.features[index],
            {k: v[index] for k, v in self.attention.items()},
            {k: v[index] for k, v in self.keys.items()},
            self.image_embeds[index],
        )


@dataclasses.dataclass(frozen=True)
class ViTAdapter:
    """How one family of CLS-token ViT exposes the parts `VisionEncoder` needs.

    For both families here the pooled output is the layer-normed CLS token (CLIP's
    `post_layernorm`, DINOv2's final `layernorm`).
    """

    name: str
    """Tower kind as reports name it, e.g. "clip", "dinov2"."""
    blocks: Callable[[nn.Module], nn.ModuleList]
    """The transformer blocks of a tower, input side first."""
    attention_site: Callable[[nn.Module], AttentionSite]
    """The q/k projections, heads and scale of one block."""
    pooled: Callable[[Any], torch.Tensor]
    """The pooled CLS embedding `(N, D)` from the tower's forward output."""
    has_text_tower: bool
    """Whether the family has a paired text encoder in the same embedding space."""


def _clip_blocks(tower: nn.Module) -> nn.ModuleList:
    body: Any = getattr(tower, "vision_model", tower)
    layers = body.encoder.layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def _clip_site(block: nn.Module) -> AttentionSite:
    attn: Any = block.self_attn
    return AttentionSite(attn.q_proj, attn.k_proj, attn.num_heads, float(attn.scale))


def _dinov2_blocks(tower: nn.Module) -> nn.ModuleList:
    body: Any = tower
    layers = body.encoder.layer
    assert isinstance(layers, nn.ModuleList)
    return layers


def _dinov2_site(block: nn.Module) -> AttentionSite:
    attn: Any = block.attention
    return AttentionSite(attn.q_proj, attn.k_proj, attn.num_attention_heads, float(attn.scaling))


def _pooler_output(out: Any) -> torch.Tensor:
    pooled = out.pooler_output
    assert isinstance(pooled, torch.Tensor)
    return pooled


CLIP_ADAPTER = ViTAdapter("clip", _clip_blocks, _clip_site, _pooler_output, has_text_tower=True)
DINOV2_ADAPTER = ViTAdapter("dinov2", _dinov2_blocks, _dinov2_site, _pooler_output,
                            has_text_tower=False)
TOWER_ADAPTERS: dict[str, ViTAdapter] = {
    "clip_vision_model": CLIP_ADAPTER,
    "clip": CLIP_ADAPTER,
    "dinov2": DINOV2_ADAPTER,
}
"""transformers `config.model_type` -> adapter; a new CLS-token ViT family registers here."""


def resolve_adapter(tower: nn.Module) -> ViTAdapter:
    """The adapter of a transformers vision tower, by its `config.model_type`."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    adapter = TOWER_ADAPTERS.get(str(model_type))
    if adapter is None:
        raise ModelLoadError(
            f"vision tower of type {model_type!r} is not supported: HERO needs a ViT with a "
            f"CLS token; supported types are {sorted(TOWER_ADAPTERS)}")
    return adapter


class VisionEncoder:
    """A CLS-token ViT (CLIP or DINOv2 vision tower) with hooks for features and CLS attention."""

    def __init__(self, tower: nn.Module, feature_layer: int = -2,
                 visual_projection: nn.Module | None = None, adapter: ViTAdapter | None = None):
        self.tower = tower.eval()
        self.adapter = adapter or resolve_adapter(tower)
        self.layers = self.adapter.blocks(tower)
        # hidden_states[j] is the input of block j (j < L) or the output of block j-1.
        n = len(self.layers)
        self.feature_index = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
        if not 0 < self.feature_index <= n:
            raise ValueError(f"feature_layer {feature_layer} is outside 1..{n} hidden states")
        self.visual_projection = visual_projection

    @property
    def kind(self) -> str:
        """The tower family ("clip", "dinov2")."""
        return self.adapter.name

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def param(self) -> torch.Tensor:
        return next(self.tower.parameters())

    @property
    def feature_dim(self) -> int:
        """Width of the features `encode` returns (the tower's hidden size)."""
        tower: Any = self.tower
        return int(tower.config.hidden_size)

    @property
    def embed_dim(self) -> int:
        """Width of the crop embeddings `encode` returns: the visual projection's output,
        or without one the tower's hidden size."""
        projection: Any = self.visual_projection
        return int(projection.out_features) if projection is not None else self.feature_dim

    def attention_site(self, layer: int) -> AttentionSite:
        """The q/k projections of block `layer` (0-based)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"attention layer {layer} is outside 0..{self.num_layers - 1}")
        return self.adapter.attention_site(self.layers[layer])

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, attention_layers: Sequence[int] = (),
               key_layers: Sequence[int] = ()) -> EncodedCrops:
        """Encode crops `(N, 3, H, W)` in one tower pass (see `EncodedCrops`)."""
        param = self.param
        sites = {layer: self.attention_site(layer) for layer in {*attention_layers, *key_layers}}
        captured: list[torch.Tensor] = []

        def keep(_m: nn.Module, _i: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)

        handle = self.layers[self.feature_index - 1].register_forward_hook(keep)
        try:
            with ClsAttentionProbe(sites, keep_keys=frozenset(key_layers)) as probe:
                out = self.tower(pixel_values.to(param.device, param.dtype))
        finally:
            handle.remove()
        pooled = self.adapter.pooled(out)
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)
        embeds = nn.functional.normalize(pooled.float(), dim=-1)
        return EncodedCrops(captured[0][:, 1:], probe.attention, probe.keys, embeds)


def strip_answer_format(question: str, suffixes: Sequence[str] = ANSWER_FORMAT_SUFFIXES) -> str:
    """Drop answer-format instructions and the image placeholder from a question."""
    text = question.replace("<image>", " ").strip()
    changed = True
    while changed:
        changed = False
        for suffix in suffixes:
            if text.endswith(suffix):
                text, changed = text[: -len(suffix)].rstrip(), True
    return text


class RelevanceEncoder(Protocol):
    """Embeds a question into the space of a vision encoder's `image_embeds`, so that
    `tile . question` scores a tile's relevance (HERO's relevance term)."""

    tower_kind: str
    """The vision tower family (`VisionEncoder.kind`) whose image embeddings it scores."""

    def embed(self, question: str) -> torch.Tensor:
        """L2-normalised embedding `(P,)` fp32 of `question`, P = the image embeddings' width."""
        ...


class TextEncoder:
    """The CLIP text tower (plus its projection) that scores a question against tiles."""

    tower_kind = "clip"

    def __init__(self, text_model: nn.Module, text_projection: nn.Module, tokenizer: Any,
                 max_length: int = 77):
        self.text_model = text_model.eval()
        self.text_projection = text_projection
        self.tokenizer = tokenizer
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, question: str) -> torch.Tensor:
        """L2-normalised CLIP text embedding `(P,)` fp32 of `question` (77-token truncation)."""
        text = strip_answer_format(question) or question
        batch = self.tokenizer([text], truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.text_model.parameters()).device
        out = self.text_model(input_ids=batch["input_ids"].to(device))
        embed = self.text_projection(out.pooler_output).float()[0]
        return nn.functional.normalize(embed, dim=-1)
