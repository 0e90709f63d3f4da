"""LLM prefill time against retention, on a ~1B-parameter Llama shape.

The sequence is what LLaVA-NeXT prefills for one 2x2-grid image plus a 40-token
prompt: at retention 1.0 the 2,928 visual embeddings (576 thumbnail + 2,304 tiles +
48 newlines), at lower retention HERO's kept tokens plus their newlines (counted by
running HERO on the image grid). Random weights, fp32, SDPA, one forward with the KV
cache, logits for the last position only (as `generate` does).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from hero_core.encoder import EncodedCrops
from hero_core.methods import create_method
from hero_core.stages import prune_crops
from hero_core.tiling import TilingSpec, plan_grid

RETENTIONS = (1.0, 0.222, 0.111, 0.056)
PROMPT_TOKENS = 40
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}


def visual_embeddings(ratio: float) -> int:
    """LLM image embeddings HERO produces for a 2x2-grid image at `ratio`."""
    grid = plan_grid((672, 680), TilingSpec())
    g = torch.Generator().manual_seed(0)
    n = grid.num_crops
    crops = EncodedCrops(torch.zeros(n, 576, 1),
                         {layer: torch.rand(n, 576, generator=g) for layer in (11, 22)}, {},
                         torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1))
    return prune_crops(crops, grid, create_method("hero"), ratio).packed.num_embeddings


def prefill_flops(tokens: int) -> float:
    """Forward FLOPs of the prefill: 2 x weights x tokens plus causal attention."""
    h, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    kv = h * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * SHAPE["intermediate_size"]
    linear = 2 * tokens * layers * per_layer + 2 * h * SHAPE["vocab_size"]  # one logit row
    attention = layers * 2 * 2 * h * tokens * (tokens + 1) / 2
    return linear + attention


def run(repeats: int = 2) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with torch.inference_mode():
        model(inputs_embeds=torch.randn(1, 64, SHAPE["hidden_size"]), logits_to_keep=1)
        for ratio in RETENTIONS:
            tokens = PROMPT_TOKENS + visual_embeddings(ratio)
            embeds = torch.randn(1, tokens, SHAPE["hidden_size"])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - start)
            rows.append({"ratio": ratio, "tokens": tokens, "seconds": statistics.median(times),
                         "flops": prefill_flops(tokens)})
    return {"params": params, "rows": rows, "repeats": repeats}


def report(r: dict[str, Any]) -> str:
    full = r["rows"][0]
    lines = [
        "## LLM prefill against retention (~1B Llama shape)",
        "",
        f"{r['params'] / 1e9:.2f} B parameters (hidden {SHAPE['hidden_size']}, "
        f"{SHAPE['num_hidden_layers']} layers, GQA {SHAPE['num_attention_heads']}/"
        f"{SHAPE['num_key_value_heads']} heads), random weights, fp32, SDPA; one prefill of a "
        f"{PROMPT_TOKENS}-token prompt plus the visual embeddings of one 2x2-grid image "
        f"(HERO's kept tokens and their newlines). Median of {r['repeats']} runs.",
        "",
        "| retention | prefill tokens | prefill s | measured speedup | theoretical FLOP ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['ratio']:g} | {row['tokens']} | {row['seconds']:.2f} | "
                     f"{full['seconds'] / row['seconds']:.1f}x | "
                     f"{full['flops'] / row['flops']:.1f}x |")
    r111 = next(row for row in r["rows"] if row["ratio"] == 0.111)
    lines += ["", f"At retention 0.111: **{full['seconds'] / r111['seconds']:.1f}x** faster "
              "prefill (target >= 5x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
