"""How much of the prompt prefix two different questions about one image share.

The language engine reuses a prompt's KV blocks (16 tokens) that another request
computed when every input up to a block's end is identical (`services.language.
batching.prefix`). The prompt starts with the text before the image, then the kept
visual tokens in their packed order, so two requests about one image share the blocks
of that visual prefix up to the first kept token that differs. HERO splits its token
budget across tiles partly by the question's relevance, so two different questions may
keep different tokens; a method that does not read the question (fastervlm) keeps the
same ones for every question.

For each image (distinct 2x2-grid PNGs cut from a real photo with seeded noise, as the
load tests send) and each pair of different questions: the full blocks of the visual
prefix (text before the image + visual tokens, hashed by the engine's own
`PrefixKeys`) and how many of them are identical between the two questions' prompts.
The model has the CLIP-ViT-L/14-336 tower shapes with random weights
(`models/bench-clip-l`), the method's default retention is the service's
(`VisionConfig.default_retention`); the text tower that routes HERO's budgets has
random weights too, so how far two questions' budgets differ here is what untrained
relevance scores make of them, not what a trained CLIP would.

Run it with `python -m loadtest.micro.prefix_share`, which prints the markdown section.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hero_core.generation import format_chat
from hero_core.methods import create_method
from hero_core.models import load_vlm, resolve_spec
from hero_core.pipeline import Pruner
from hero_core.stages import select_tokens
from loadtest.runner import photo_variant
from services.language.batching.prefix import PrefixKeys
from services.vision.config import VisionConfig

MODEL_DIR = Path("models/bench-clip-l")
IMAGES = 4
QUESTIONS = ("What is the person holding?", "What colour is the sky?",
             "Is there any text on the suit?", "Describe the background.")
METHODS = ("hero", "fastervlm")
BLOCK = 16


def visual_prefix(tokenizer: Any, image_token_id: int, packed: Any,
                  question: str) -> list[bytes]:
    """The engine's hashes of the full blocks of the prompt up to the image's end."""
    ids = tokenizer(format_chat(tokenizer, [("user", question)]),
                    return_tensors="pt").input_ids[0]
    keys = PrefixKeys(ids, packed, image_token_id, BLOCK)
    return keys.upto(keys.image_end // BLOCK, [])


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items `a` and `b` have in common (blocks, token ids, ...)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def run(images: int = IMAGES) -> dict[str, Any]:
    retention = VisionConfig.model_fields["default_retention"].default
    vlm = load_vlm(resolve_spec(str(MODEL_DIR), MODEL_DIR.parent, "cpu", "float32"))
    pruner = Pruner(vlm.vision_encoder(), vlm.tiling, vlm.text_encoder)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in range(images):
        tiled = pruner.stage.tile(photo_variant(seed))
        for name in METHODS:
            method = create_method(name)
            entry = pruner.stage.entry(tiled, method, retention)
            prefixes = {}
            for question in QUESTIONS:
                packed = select_tokens(entry, method, retention,
                                       pruner.embed_question(question, method)).packed
                prefixes[question] = (packed.num_tokens, visual_prefix(
                    vlm.tokenizer, vlm.image_token_id, packed, question))
            for q1, q2 in itertools.combinations(QUESTIONS, 2):
                (kept, a), (_, b) = prefixes[q1], prefixes[q2]
                rows[name].append({"image": seed, "kept": kept, "blocks": len(a),
                                   "common": common_prefix(a, b)})
    return {"retention": retention, "rows": rows, "images": images}


def report(r: dict[str, Any]) -> str:
    lines = [
        "## Prefix shared by two questions about one image",
        "",
        f"{r['images']} images (2x2 grids: distinct 672x680 PNGs cut from a real photo with "
        f"seeded noise), {len(QUESTIONS)} questions each ({', '.join(QUESTIONS)}), every "
        f"pair of different questions ({len(QUESTIONS) * (len(QUESTIONS) - 1) // 2} per "
        f"image), at the service's default retention {r['retention']}. The visual prefix "
        "is what the language engine hashes into KV blocks of 16 before the question: the "
        "chat template's text before the image, then the kept visual tokens in their "
        "packed order (`services/language/batching/prefix.py`'s `PrefixKeys`). A block is "
        "shared when it and every block before it hash the same for both questions. "
        "Vision tower and text tower with the CLIP-ViT-L/14-336 shapes and random weights "
        "(`models/bench-clip-l`): HERO's question routing follows untrained relevance "
        "scores here.",
        "",
        "| method | visual tokens kept | visual-prefix blocks | blocks shared (mean) | "
        "min | max | share of the prefix | pairs sharing all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in METHODS:
        rows = r["rows"][name]
        kept = statistics.mean(x["kept"] for x in rows)
        blocks = statistics.mean(x["blocks"] for x in rows)
        got = [x["common"] for x in rows]
        frac = sum(got) / sum(x["blocks"] for x in rows)
        every = sum(x["common"] == x["blocks"] for x in rows)
        lines.append(f"| {name} | {kept:.0f} | {blocks:.1f} | {statistics.mean(got):.1f} | "
                     f"{min(got)} | {max(got)} | **{frac:.0%}** | {every} of {len(rows)} |")
    hero = r["rows"]["hero"]
    per_image = []
    for seed in range(r["images"]):
        mine = [x for x in hero if x["image"] == seed]
        share = sum(x["common"] for x in mine) / sum(x["blocks"] for x in mine)
        per_image.append(f"image {seed}: {share:.0%}")
    lines += [
        "",
        "HERO by image: " + ", ".join(per_image) + ". A follow-up turn in the same "
        "conversation shares the whole visual prefix with either method: the vision "
        "service selects a conversation's tokens for its first question "
        "(`services/vision/pipeline.py`, `first_question`), so only requests whose first "
        "questions differ are split as above. fastervlm does not read the question and "
        "shares every block. This section alone: `.ci/isolated .venv/bin/python -m "
        "loadtest.bench --only \"prefix shared by two questions\"` (the machine above).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
