"""A small answer model on frozen visual tokens: it reads any subset of them.

Each token is its feature (a fixed PCA projection, then a learned one) plus a learned
embedding of its slot: its crop (0 = thumbnail, 1..4 = tile) and its patch position
in that crop. The question (a few words from a small vocabulary) becomes one query
that attends to the tokens through a couple of cross-attention blocks and is
classified over the answer vocabulary.

The tokens are a set: nothing depends on their order, only on the features and the
crop / position ids they carry, so the model gives the same answer for any
permutation of the tokens, and padding (masked out) changes nothing. That is what
lets it be evaluated on whatever a pruning method keeps. It is trained on all tokens
and on random and attention-concentrated subsets of them (see
`evaluation.training_batches`), so that no kind of kept set is foreign to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from evals.fidelity.data import question_words
from hero_core.config import require

PAD, UNKNOWN = 0, 1


@dataclasses.dataclass(frozen=True)
class AnswerModelConfig:
    """Size and training schedule of the answer model."""

    width: int = 64
    """Model width (token projection, query, attention)."""
    heads: int = 4
    blocks: int = 2
    """Cross-attention blocks (query attends to the tokens, then an MLP)."""
    epochs: int = 30
    batch_mosaics: int = 16
    """Mosaics per step; every question of a mosaic is a query over its tokens."""
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    max_words: int = 12
    full_batch_share: float = 0.25
    """Share of training batches that hold every token of their mosaics."""
    focused_batch_share: float = 0.375
    """Share of batches that keep each mosaic's top tokens by the CLS attention of a
    random layer (concentrated subsets); the remaining batches keep uniformly random
    tokens (spread subsets)."""
    min_keep_ratio: float = 0.04
    """Subsets keep a share of the tokens drawn log-uniformly from [min_keep_ratio, 1]."""

    def __post_init__(self) -> None:
        shares = (self.full_batch_share, self.focused_batch_share)
        require(min(shares) >= 0.0 and sum(shares) <= 1.0,
                "full_batch_share and focused_batch_share must be >= 0 and sum to <= 1")
        require(0.0 < self.min_keep_ratio <= 1.0, "min_keep_ratio must be in (0, 1]")
        require(self.width % self.heads == 0, "width must be a multiple of heads")
        require(self.blocks > 0 and self.epochs > 0, "blocks and epochs must be > 0")


class Vocabulary:
    """Word ids of questions (0 = padding, 1 = unknown) and answer ids."""

    def __init__(self, questions: Sequence[str], answers: Sequence[str]):
        words = sorted({w for q in questions for w in question_words(q)})
        self.words = {w: i + 2 for i, w in enumerate(words)}
        self.answers = {a: i for i, a in enumerate(answers)}

    def encode(self, question: str, max_words: int) -> list[int]:
        ids = [self.words.get(w, UNKNOWN) for w in question_words(question)][:max_words]
        return ids + [PAD] * (max_words - len(ids))

    @property
    def num_words(self) -> int:
        return len(self.words) + 2


class CrossAttentionBlock(nn.Module):
    """Queries `(B, Q, W)` read (normalised) tokens `(B, N, W)`, then a per-query MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.q, self.kv, self.out = (nn.Linear(width, width), nn.Linear(width, 2 * width),
                                     nn.Linear(width, width))
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor) -> torch.Tensor:
        b, q_len, width = query.shape
        q = self.q(self.norm_q(query)).view(b, q_len, self.heads, -1).transpose(1, 2)
        k, v = self.kv(tokens).view(b, -1, 2, self.heads, width // self.heads
                                    ).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=token_mask[:, None, None, :])
        query = query + self.out(attended.transpose(1, 2).reshape(b, q_len, width))
        out: torch.Tensor = query + self.mlp(query)
        return out


class AnswerModel(nn.Module):
    """Answer logits for questions over a masked set of visual tokens."""

    def __init__(self, feature_dim: int, num_crops: int, tokens_per_crop: int, num_words: int,
                 num_answers: int, config: AnswerModelConfig):
        super().__init__()
        w = config.width
        self.tokens_per_crop = tokens_per_crop
        self.project = nn.Linear(feature_dim, w)
        self.slot_embed = nn.Embedding(num_crops * tokens_per_crop, w)
        self.token_norm = nn.LayerNorm(w)
        self.word_embed = nn.Embedding(num_words, w, padding_idx=PAD)
        self.word_position = nn.Embedding(config.max_words, w)
        self.question_mlp = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(CrossAttentionBlock(w, config.heads)
                                    for _ in range(config.blocks))
        self.head = nn.Sequential(nn.LayerNorm(2 * w), nn.Linear(2 * w, 2 * w), nn.GELU(),
                                  nn.Linear(2 * w, num_answers))

    def embed_tokens(self, features: torch.Tensor, crop: torch.Tensor,
                     position: torch.Tensor) -> torch.Tensor:
        """features `(B, N, D)`, crop and position `(B, N)` long -> `(B, N, W)`."""
        slot = self.slot_embed(crop * self.tokens_per_crop + position)
        out: torch.Tensor = self.token_norm(self.project(features.float()) + slot)
        return out

    def embed_questions(self, words: torch.Tensor) -> torch.Tensor:
        """Word ids `(B, Q, max_words)` -> one query per question `(B, Q, W)`."""
        mask = (words != PAD).unsqueeze(-1).float()
        slots = torch.arange(words.shape[-1], device=words.device)
        summed = ((self.word_embed(words) + self.word_position(slots)) * mask).sum(-2)
        out: torch.Tensor = self.question_mlp(summed / mask.sum(-2).clamp_min(1.0))
        return out

    def forward(self, features: torch.Tensor, crop: torch.Tensor, position: torch.Tensor,
                token_mask: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Logits `(B, Q, answers)`; `token_mask` `(B, N)` is True for real tokens."""
        tokens = self.embed_tokens(features, crop, position)
        question = self.embed_questions(words)
        query = question
        for block in self.blocks:
            query = block(query, tokens, token_mask)
        out: torch.Tensor = self.head(torch.cat([query, question], -1))
        return out


@dataclasses.dataclass
class TokenBatch:
    """Padded visual tokens and questions of a few mosaics."""

    features: torch.Tensor
    """`(B, N, D)`"""
    crop: torch.Tensor
    """`(B, N)` long"""
    position: torch.Tensor
    """`(B, N)` long"""
    token_mask: torch.Tensor
    """`(B, N)` bool: real tokens"""
    words: torch.Tensor
    """`(B, Q, max_words)` long"""
    answers: torch.Tensor
    """`(B, Q)` long answer ids, -100 for padding questions"""


def pad_batch(token_sets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              words: torch.Tensor, answers: torch.Tensor) -> TokenBatch:
    """Pad mosaics' (features `(n, D)`, crop `(n,)`, position `(n,)`) into one batch with
    their questions' word ids `(B, Q, max_words)` and answer ids `(B, Q)`."""
    n = max(f.shape[0] for f, _, _ in token_sets)
    b, d = len(token_sets), token_sets[0][0].shape[1]
    batch = TokenBatch(torch.zeros(b, n, d), torch.zeros(b, n, dtype=torch.long),
                       torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, dtype=torch.bool),
                       words, answers)
    for i, (feats, crop, pos) in enumerate(token_sets):
        batch.features[i, :len(feats)] = feats.float()
        batch.crop[i, :len(crop)], batch.position[i, :len(pos)] = crop, pos
        batch.token_mask[i, :len(feats)] = True
    return batch


def run_model(model: AnswerModel, batch: TokenBatch) -> torch.Tensor:
    """Logits `(B, Q, answers)` of a padded batch."""
    out: torch.Tensor = model(batch.features, batch.crop, batch.position, batch.token_mask,
                              batch.words)
    return out


def train_model(model: AnswerModel, batches: Iterator[TokenBatch], steps: int,
                config: AnswerModelConfig) -> list[float]:
    """AdamW with a cosine schedule over `steps` batches; returns the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches, strict=False):
        logits = run_model(model, batch)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.answers.flatten(),
                                           ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.inference_mode()
def predict(model: AnswerModel, batch: TokenBatch) -> torch.Tensor:
    """Predicted answer ids `(B, Q)` (padding questions predict anything)."""
    return run_model(model, batch).argmax(-1)
