"""The `tiny` preset: a LLaVA-NeXT and matching CLIP checkpoint built offline.

The architecture family is the real one (CLIP vision tower with a CLS token and 24
blocks so HERO's default layers exist, 2-layer MLP projector, image_newline, Llama
LM, CLIP text tower sharing the vision weights), only narrow; the weights are
seeded random and the tokenizer is a byte-level BPE trained on a built-in text.
`python -m hero_core.tiny OUT_DIR` writes `OUT_DIR/llava` and `OUT_DIR/clip`, which
load through `hero_core.models.load_vlm` exactly like a hub checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from hero_core.tiling import CLIP_MEAN, CLIP_STD, LLAVA_V16_PINPOINTS

SEED = 1234
FORMAT_VERSION = 3
"""Bump when the tiny checkpoint changes so `make setup` rebuilds it."""
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CORPUS = """
A photograph shows a cat sitting on a wooden table next to a window. The sky is blue
and there are two birds on the roof. What colour is the car in the street? The car is
red. How many people are standing near the door? There are three people. Is there a
dog in the picture? No, there is no dog. Describe the image in detail. The image shows
a busy market with fruit, vegetables, flowers and bread. The text on the sign reads
open. Where is the bicycle? The bicycle is leaning against the green fence on the left.
What is the man holding? He is holding a camera and a cup of coffee. The building in
the background is tall, made of glass and steel. Astronaut, rocket, moon, earth, space,
coffee, chelsea, horse, chair, lamp, book, phone, computer, mountain, river, tree, road.
"""


def build_tokenizer(bos_eos: bool) -> Any:
    """A byte-level BPE tokenizer (any text encodes) with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    template = "<s> $A </s>" if bos_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        model_max_length=77 if bos_eos else 8192,
    )


SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "projection_dim": 32, "text_hidden": 48, "text_layers": 2, "text_heads": 4},
    # CLIP-ViT-L/14-336 towers (vision and text) for benchmarks; the LM stays tiny.
    "clip-l": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
               "projection_dim": 768, "text_hidden": 768, "text_layers": 12,
               "text_heads": 12},
}


LM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    # A ~0.25B Llama (GQA 16/4 heads, a 32,000-token vocabulary like LLaVA's Vicuna) for
    # language-service benchmarks; ids past the tiny tokenizer decode to no text.
    "llama-0.3b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000},
}


def vision_config(shape: str = "tiny") -> Any:
    from transformers import CLIPVisionConfig

    dims = SHAPES[shape]
    return CLIPVisionConfig(
        hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
        num_hidden_layers=24, num_attention_heads=dims["num_attention_heads"],
        image_size=336, patch_size=14, projection_dim=dims["projection_dim"],
        hidden_act="quick_gelu", initializer_range=0.1, initializer_factor=4.0,
    )


def build_llava(out: Path, tokenizer: Any, shape: str = "tiny", lm: str = "tiny") -> Any:
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    text = LlamaConfig(
        **{"vocab_size": len(tokenizer), **LM_SHAPES[lm]}, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision_config(shape).to_dict(), text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[list(p) for p in LLAVA_V16_PINPOINTS],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in LLAVA_V16_PINPOINTS],
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return model


def build_clip(out: Path, llava: Any, tokenizer: Any, shape: str = "tiny") -> None:
    """A CLIP checkpoint whose vision tower is the tiny LLaVA's, plus a text tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    dims = SHAPES[shape]
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=dims["text_hidden"],
        intermediate_size=4 * dims["text_hidden"], num_hidden_layers=dims["text_layers"],
        num_attention_heads=dims["text_heads"], max_position_embeddings=77,
        projection_dim=dims["projection_dim"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(),
                        vision_config=vision_config(shape).to_dict(),
                        projection_dim=dims["projection_dim"])
    torch.manual_seed(SEED + 1)
    clip = CLIPModel(config).eval()
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny(out_dir: Path, shape: str = "tiny", lm: str = "tiny") -> Path:
    """Write the tiny LLaVA-NeXT (`out_dir/llava`) and CLIP (`out_dir/clip`) checkpoints;
    `shape="clip-l"` gives them CLIP-ViT-L/14-336-sized towers, `lm="llama-0.3b"` a
    ~0.25B Llama language model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    llava = build_llava(out_dir / "llava", build_tokenizer(bos_eos=False), shape, lm)
    build_clip(out_dir / "clip", llava, build_tokenizer(bos_eos=True), shape)
    stamp = {"version": FORMAT_VERSION, "seed": SEED, "shape": shape, "lm": lm}
    (out_dir / "BUILD.json").write_text(json.dumps(stamp))
    return out_dir


def is_built(out_dir: Path, shape: str = "tiny", lm: str = "tiny") -> bool:
    """Whether `out_dir` holds a checkpoint of this shape and the current format version."""
    stamp = out_dir / "BUILD.json"
    if not stamp.exists():
        return False
    built = json.loads(stamp.read_text())
    return bool(built.get("version") == FORMAT_VERSION and built.get("shape", "tiny") == shape
                and built.get("lm", "tiny") == lm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write (e.g. models/tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--lm", choices=sorted(LM_SHAPES), default="tiny")
    args = parser.parse_args()
    if is_built(args.out_dir, args.shape, args.lm) and not args.force:
        print(f"tiny model up to date in {args.out_dir}")
        return
    build_tiny(args.out_dir, args.shape, args.lm)
    print(f"tiny model written to {args.out_dir}")


if __name__ == "__main__":
    main()
