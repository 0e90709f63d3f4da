"""The KV cache of a batching engine: one preallocated pool of token slots, cut into
blocks, and the transformers `Cache` that lets a stock model read and write it.

Slot `b * block_size + i` holds position i of block b; which blocks a sequence holds,
and which hold a reusable prefix, is `blocks.py`'s business. Memory in use is exactly
the blocks held, and nothing is allocated per step. For one forward, `PooledCache`
writes the new keys and values of each row into its slots and hands the attention
layers the rows gathered into a left-padded `(B, kv_heads, W, head_dim)` tensor (a view
of the pool, without a copy, when the forward has one row whose slots are consecutive);
padding reads a slot that is always zero and is masked out by the 2-D attention mask
transformers turns into its causal mask. Attention itself is the model's own (SDPA,
eager or flash).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from services.language.model import KVShape


class KVPool:
    """Keys and values `(kv_heads, num_blocks * block_size + 1, head_dim)` per layer; the
    last slot is the padding slot and stays zero."""

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.shape, self.device = shape, device
        self.num_blocks, self.block_size = num_blocks, block_size
        self.capacity = num_blocks * block_size
        size = (shape.kv_heads, self.capacity + 1, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device)
                     for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device)
                       for _ in range(shape.layers)]

    @property
    def pad_slot(self) -> int:
        return self.capacity

    @property
    def bytes(self) -> int:
        return self.capacity * self.shape.bytes_per_token


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where one forward's rows read and write in the pool.

    write: `(B * q,)` slots that receive the new tokens, row by row.
    gather: `(B * W,)` slots of each row's whole sequence, left-padded to width W with
    the padding slot; a `slice` when one row's slots are consecutive (read in place,
    no copy); None when every row is new (nothing to read but the new tokens).
    """

    batch: int
    query_length: int
    width: int
    write: torch.Tensor
    gather: torch.Tensor | slice | None


class PooledLayer(CacheLayerMixin):
    """One decoder layer's view of the pool for one forward."""

    is_sliding = False

    def __init__(self, pool: KVPool, layer: int, step: StepLayout):
        super().__init__()
        self.pool, self.layer, self.step = pool, layer, step
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `(B, kv_heads, q, head_dim)` new keys and values; return every row's
        `(B, kv_heads, W, head_dim)`."""
        step = self.step
        out = []
        for pool, new in ((self.pool.keys[self.layer], key_states),
                          (self.pool.values[self.layer], value_states)):
            heads, dim = pool.shape[0], pool.shape[2]
            rows = new.transpose(0, 1).reshape(heads, step.batch * step.query_length, dim)
            pool.index_copy_(1, step.write, rows.to(pool.dtype))
            if step.gather is None:
                out.append(new)
                continue
            if isinstance(step.gather, slice):
                out.append(pool[:, step.gather].unsqueeze(0))
                continue
            gathered = pool.index_select(1, step.gather)
            out.append(gathered.view(heads, step.batch, step.width, dim).transpose(0, 1))
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.step.width, 0

    def get_seq_length(self) -> int:
        return self.step.width - self.step.query_length

    def get_max_length(self) -> int:
        return -1


class PooledCache(Cache):
    """A transformers `Cache` over the pool for one forward described by `step`."""

    def __init__(self, pool: KVPool, step: StepLayout):
        super().__init__(layers=[PooledLayer(pool, i, step) for i in range(pool.shape.layers)])
