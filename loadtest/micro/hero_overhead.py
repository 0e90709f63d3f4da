"""HERO's own cost next to the vision tower it rides on.

On a CLIP-ViT-L/14-336-shaped tower (random weights, fp32, 5 crops = one 2x2 image)
it times, side by side in one process: the tower forward that LLaVA-NeXT runs
anyway, and each piece HERO adds (the CLS-row probe at two layers, the CLIP text
tower on a question, budget allocation + selection, and the gather/pack). In
separate processes it measures the peak memory of a forward with the probe against
one with `output_attentions=True` (eager), each over a plain forward.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hero_core.encoder import TextEncoder, VisionEncoder
from hero_core.methods import create_method
from hero_core.packing import pack_tokens
from hero_core.probe import cls_attention_row
from hero_core.tiling import TilingSpec, plan_grid

CROPS = 5
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
"""CLIP-ViT-L/14-336's vision tower."""
QUESTION = "What is written on the small sign next to the red door on the left?"


def clip_l_vision(attn: str = "sdpa") -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(**VISION, projection_dim=768)
    config._attn_implementation = attn
    return CLIPVisionModel(config).eval()


def clip_l_text() -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77,
                            projection_dim=768, vocab_size=49408)
    return CLIPTextModel(config).eval(), torch.nn.Linear(768, 768, bias=False)


class _Tokenizer:
    """Stands in for CLIP's BPE: a question of ~20 tokens, the usual length."""

    def __call__(self, texts: list[str], **_: Any) -> dict[str, torch.Tensor]:
        n = min(77, 2 + len(texts[0].split()) * 2)
        return {"input_ids": torch.randint(1, 49407, (1, n))}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_timing(repeats: int = 3) -> dict[str, float]:
    torch.set_grad_enabled(False)
    tower = clip_l_vision()
    encoder = VisionEncoder(tower, feature_layer=-2, visual_projection=torch.nn.Linear(1024, 768))
    text_model, text_proj = clip_l_text()
    text = TextEncoder(text_model, text_proj, _Tokenizer())
    pixels = torch.randn(CROPS, 3, 336, 336)
    grid = plan_grid((672, 680), TilingSpec())
    hero = create_method("hero")
    encoded = encoder.encode(pixels, hero.attention_layers())
    question = QUESTION
    q = text.embed(question)
    keys = torch.randn(CROPS, 577, 1024)
    q_cls = torch.randn(CROPS, 1024)

    # Interleave the two forwards so drift on a shared machine hits both alike.
    plain, probed = [], []
    for _ in range(repeats):
        plain.append(_median_ms(lambda: encoder.encode(pixels), 1))
        probed.append(_median_ms(lambda: encoder.encode(pixels, hero.attention_layers()), 1))
    selection = hero.select(encoded, grid, 0.111, q)
    return {
        "tower_forward_ms": statistics.median(plain),
        "tower_forward_spread_ms": max(plain) - min(plain),
        "tower_forward_with_probe_ms": statistics.median(probed),
        "probe_math_ms": 2 * _median_ms(lambda: cls_attention_row(q_cls, keys, 16, 0.125),
                                        repeats * 5),
        "text_tower_ms": _median_ms(lambda: text.embed(question), repeats * 5),
        "allocate_select_ms": _median_ms(lambda: hero.select(encoded, grid, 0.111, q),
                                         repeats * 5),
        "gather_pack_ms": _median_ms(lambda: pack_tokens(selection, encoded.features, grid),
                                     repeats * 5),
    }


def _peak_child(mode: str) -> int:
    """Run one forward in a fresh process; returns its peak RSS in bytes."""
    code = f"from loadtest.micro.hero_overhead import _forward_once; _forward_once({mode!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _forward_once(mode: str) -> None:
    torch.set_grad_enabled(False)
    tower = clip_l_vision("eager" if mode == "attentions" else "sdpa")
    pixels = torch.randn(CROPS, 3, 336, 336)
    if mode == "attentions":
        out = tower(pixels, output_attentions=True)
        row = [a[:, :, 0, 1:].sum(1) for a in out.attentions]
        del row
    elif mode == "probe":
        VisionEncoder(tower).encode(pixels, attention_layers=hero_layers())
    else:
        VisionEncoder(tower).encode(pixels)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def hero_layers() -> tuple[int, ...]:
    """The layers whose CLS row HERO reads (its defaults)."""
    return tuple(create_method("hero").attention_layers())


def run_memory() -> dict[str, int]:
    return {mode: _peak_child(mode) for mode in ("plain", "probe", "attentions")}


def report(timing: dict[str, float], memory: dict[str, int]) -> str:
    """Markdown section for docs/BENCHMARKS.md."""
    t = timing
    pieces = ["probe_math_ms", "text_tower_ms", "allocate_select_ms", "gather_pack_ms"]
    added = sum(t[p] for p in pieces)
    share = added / t["tower_forward_ms"]
    mib = 1024 * 1024
    extra_probe = (memory["probe"] - memory["plain"]) / mib
    layers, patches = hero_layers(), (VISION["image_size"] // VISION["patch_size"]) ** 2
    keys_mib = CROPS * (patches + 1) * VISION["hidden_size"] * 4 / mib
    extra_attn = (memory["attentions"] - memory["plain"]) / mib
    lines = [
        "## HERO overhead on the CLIP-ViT-L/14-336 shape",
        "",
        f"Random weights, fp32, {CROPS} crops (one 2x2 image), SDPA attention, question of "
        f"{len(_Tokenizer()([QUESTION])['input_ids'][0])} CLIP tokens. Median of interleaved "
        "repeats, one process.",
        "",
        "| piece | ms | share of tower forward |",
        "|---|---:|---:|",
        f"| vision tower forward (runs anyway) | {t['tower_forward_ms']:.0f} | 100 % |",
    ]
    names = {"probe_math_ms": "CLS-row probe, 2 layers", "text_tower_ms": "CLIP text tower",
             "allocate_select_ms": "budget allocation + selection",
             "gather_pack_ms": "gather + pack"}
    for p in pieces:
        lines.append(f"| {names[p]} | {t[p]:.2f} | {t[p] / t['tower_forward_ms']:.2%} |")
    ab = t["tower_forward_with_probe_ms"] - t["tower_forward_ms"]
    lines += [
        f"| **HERO total** | **{added:.1f}** | **{share:.2%}** (target <= 3 %) |",
        "",
        f"Forward with the probe hooks attached: {t['tower_forward_with_probe_ms']:.0f} ms "
        f"against {t['tower_forward_ms']:.0f} ms without (A/B difference {ab:+.0f} ms; "
        f"plain forwards alone spread over {t['tower_forward_spread_ms']:.0f} ms in this run, "
        "so the component timings above are the direct measure).",
        "",
        "Peak memory of one forward, over a plain forward (fresh process each):",
        "",
        "| mode | extra peak RSS |",
        "|---|---:|",
        f"| CLS-row probe at layers {' and '.join(map(str, layers))} | {extra_probe:.0f} MiB |",
        f"| `output_attentions=True` (eager, all {VISION['num_hidden_layers']} layers) | "
        f"{extra_attn:.0f} MiB |",
        "",
        f"The probe keeps one layer's keys at a time ({CROPS} x {patches + 1} x "
        f"{VISION['hidden_size']} fp32 = {keys_mib:.0f} MiB) and {len(layers)} "
        f"`({CROPS}, {patches})` rows; that transient stays under the forward's own peak.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    timing, memory = run_timing(), run_memory()
    print(json.dumps({"timing": timing, "memory": memory}, indent=2))
    print(report(timing, memory))


if __name__ == "__main__":
    main()
