"""Which methods, variants and layers the benchmark runs, for a tower of any depth.

The registry's defaults name layers of CLIP-ViT-L (24 layers). For a tower of `L`
layers they map by role: HERO's object stage (11 of 24, just below the middle)
becomes `L // 2 - 1`, and every "late" layer (22 of 24: the penultimate, also the
layer LLaVA takes its features from) becomes `L - 2`. For DINOv2 ViT-S (12 layers):
L_obj = 5, L_art = 10, FasterVLM / HiRED / VisionZip / GlobalCom2 rank at 10, and
HiRED's guide stays at layer 0.

HERO's main rows run without their relevance term (`use_relevance=False`): DINOv2 has
no paired text tower, so those tile budgets come from saliency alone. The relevance
rows pair it with a sentence encoder and a learned projection
(`hero_core.relevance`), as CLIP's text tower pairs with LLaVA-NeXT's; their
saliency weight `lam` and budget temperature `tau` are chosen on validation.
"""

from __future__ import annotations

import dataclasses

from evals.fidelity.evaluation import MethodSpec
from hero_core.methods.hero import EQUAL_BUDGETS_TEMPERATURE

BASELINES = ("random", "fastervlm", "hired", "visionzip", "globalcom2")
"""The registry's other methods, in report order."""
UNIFORM_TEMPERATURE = EQUAL_BUDGETS_TEMPERATURE
BASE_LABEL = "hero (as reconstructed)"
UNIFORM_LABEL = "uniform tile budgets"
SWEEP_MODES: dict[str, tuple[str, dict[str, object]]] = {
    "": (BASE_LABEL, {}),
    "_uniform": (UNIFORM_LABEL, {"budget_temperature": UNIFORM_TEMPERATURE}),
}
"""Layer sweeps run twice: table-key suffix -> (the ablation row they vary, its changes)."""


@dataclasses.dataclass(frozen=True)
class TowerLayers:
    """The layers the methods read, for one tower depth."""

    num_layers: int

    @property
    def object_layer(self) -> int:
        return self.num_layers // 2 - 1

    @property
    def late_layer(self) -> int:
        return self.num_layers - 2


def hero_spec(label: str, layers: TowerLayers, **changes: object) -> MethodSpec:
    """HERO at the mapped layers, relevance off, with `changes` to its settings."""
    settings: dict[str, object] = {"object_layer": layers.object_layer,
                                   "artifact_layer": layers.late_layer,
                                   "use_relevance": False, **changes}
    return MethodSpec(label, "hero", tuple(sorted(settings.items())))


def main_specs(layers: TowerLayers) -> list[MethodSpec]:
    """Every method of the registry, at the layers mapped to this tower."""
    late = layers.late_layer
    return [
        hero_spec("hero", layers),
        MethodSpec("full", "full"),
        MethodSpec("random", "random", seeded=True),
        MethodSpec("fastervlm", "fastervlm", (("layer", late),)),
        MethodSpec("hired", "hired", (("guide_layer", 0), ("select_layer", late))),
        MethodSpec("visionzip", "visionzip", (("layer", late),)),
        MethodSpec("globalcom2", "globalcom2", (("layer", late),)),
    ]


def reference_specs() -> list[MethodSpec]:
    """Whole crops, for scale: what the thumbnail alone and the tiles alone support."""
    return [
        MethodSpec("thumbnail only", "crop-subset", (("crops", (0,)),)),
        MethodSpec("tiles only", "crop-subset", (("crops", (1, 2, 3, 4)),)),
    ]


def ablation_specs(layers: TowerLayers) -> list[MethodSpec]:
    """HERO and one change at a time to its stages, budget split and thumbnail policy."""
    obj, late = layers.object_layer, layers.late_layer
    return [
        hero_spec(BASE_LABEL, layers),
        hero_spec(f"stage-1 only: thumbnail by L_obj={obj} too", layers, artifact_layer=obj),
        hero_spec(f"stage-2 only: tiles by L_art={late} too", layers, object_layer=late),
        hero_spec(UNIFORM_LABEL, layers, budget_temperature=UNIFORM_TEMPERATURE),
        hero_spec("softer tile budgets (tau=4)", layers, budget_temperature=4.0),
        hero_spec("sharper tile budgets (tau=0.25)", layers, budget_temperature=0.25),
        hero_spec("no thumbnail artifact tokens", layers, max_artifact_tokens=0),
        hero_spec("thumbnail share 0.5", layers, thumbnail_share=0.5),
        hero_spec("no thumbnail (share 0)", layers, thumbnail_share=0.0),
    ]


def sweep_specs(layers: TowerLayers, **changes: object,
                ) -> tuple[list[MethodSpec], list[MethodSpec]]:
    """HERO (with `changes`) over every L_obj (L_art fixed) and every L_art (L_obj fixed)."""
    by_object = [hero_spec(f"L_obj={i}", layers, **changes, object_layer=i)
                 for i in range(layers.num_layers)]
    by_artifact = [hero_spec(f"L_art={i}", layers, **changes, artifact_layer=i)
                   for i in range(layers.num_layers)]
    return by_object, by_artifact


RELEVANCE_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
"""Saliency weights `lam` the validation sweep tries with relevance on (1.0 = saliency only)."""
RELEVANCE_TEMPERATURES = (1.0, 4.0)
"""Budget temperatures `tau` the validation sweep tries (1.0 is the reconstruction's)."""
SALIENCY_LABEL = "saliency only (lam=1)"
SPEC_LABEL = "relevance, lam=0.5 (the reconstruction)"


def relevance_spec(layers: TowerLayers, weight: float, temperature: float = 1.0,
                   label: str | None = None) -> MethodSpec:
    """HERO with its relevance term at saliency weight `weight` and temperature `temperature`."""
    name = label or f"relevance, lam={weight:g}, tau={temperature:g}"
    return hero_spec(name, layers, use_relevance=True, saliency_weight=weight,
                     budget_temperature=temperature)


def relevance_sweep_specs(layers: TowerLayers) -> tuple[list[MethodSpec], list[MethodSpec]]:
    """(question-dependent, question-blind) candidates of the validation sweep: relevance at
    every `lam` and `tau`, and saliency only and equal budgets for reference."""
    routed = [relevance_spec(layers, w, t) for t in RELEVANCE_TEMPERATURES
              for w in RELEVANCE_WEIGHTS]
    blind = [hero_spec(SALIENCY_LABEL, layers),
             hero_spec(UNIFORM_LABEL, layers, budget_temperature=UNIFORM_TEMPERATURE)]
    return routed, blind
