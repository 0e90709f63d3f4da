"""What a sequence's positions hold, as far as prefix reuse needs it: the block hashes.

Position p of a sequence holds a text token (its id), or one row of the image: a kept
visual token (its pre-projector feature row and where it was kept: crop, row, column)
or an `image_newline`. The projector and the embedding table are fixed for a loaded
model, so these inputs decide the LLM's input embeddings exactly, and the embeddings
of positions 0..p decide the keys and values at p. Two sequences therefore share
block i exactly when every input up to the end of block i is identical: the same
kept tokens (same image, vision tower, method, retention and selected indices, sent
in the same dtype) placed at the same positions after the same text. The image alone
does not decide it: the same image pruned for another question, or at another
retention, shares nothing past the first visual token that differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hero_core.packing import PackedTokens, expand_image_token
from services.language.batching.blocks import block_hash


def raw(tensor: torch.Tensor) -> bytes:
    """The bytes of `tensor`'s elements, in order."""
    return bytes(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())


class PrefixKeys:
    """One sequence's inputs (prompt ids with the image spread over its rows, then the
    generated tokens) and the hashes of its full blocks, computed on demand."""

    def __init__(self, prompt_ids: torch.Tensor, packed: PackedTokens, image_token_id: int,
                 block_size: int):
        ids = expand_image_token(prompt_ids, image_token_id, packed.num_embeddings)
        self.prompt_ids: list[int] = ids.tolist()
        where = (prompt_ids == image_token_id).nonzero().flatten()
        self.image_start = int(where[0])
        self.packed, self.block_size = packed, block_size
        newline = packed.newline_after.long()
        position = torch.arange(packed.num_tokens) + torch.cumsum(newline, 0) - newline
        rows = torch.full((packed.num_embeddings,), -1, dtype=torch.long)
        rows[position] = torch.arange(packed.num_tokens)
        self.image_rows = rows
        """Feature row at each image position; -1 where an `image_newline` goes."""
        self.hashes: list[bytes] = []

    @property
    def image_end(self) -> int:
        return self.image_start + self.packed.num_embeddings

    def upto(self, blocks: int, generated: Sequence[int]) -> list[bytes]:
        """The hashes of the first `blocks` blocks; every position in them must hold a
        known input (prompt, then `generated` tokens)."""
        size = self.block_size
        while len(self.hashes) < blocks:
            start = len(self.hashes) * size
            parent = self.hashes[-1] if self.hashes else b""
            self.hashes.append(block_hash(parent, self._ids(start, start + size, generated),
                                          self._visual(start, start + size)))
        return self.hashes[:blocks]

    def _ids(self, start: int, end: int, generated: Sequence[int]) -> list[int]:
        prompt = len(self.prompt_ids)
        ids = self.prompt_ids[start:end]
        if end > prompt:
            ids += generated[max(0, start - prompt):end - prompt]
        if len(ids) != end - start:
            raise ValueError(f"positions {start}..{end} are not all known yet")
        return ids

    def _visual(self, start: int, end: int) -> bytes:
        """What the image positions in `[start, end)` hold: which are newlines, and the
        kept tokens' features and places."""
        first, last = max(start, self.image_start), min(end, self.image_end)
        if first >= last:
            return b""
        rows = self.image_rows[first - self.image_start:last - self.image_start]
        kept = rows[rows >= 0]
        p = self.packed
        return b"".join((str(p.features.dtype).encode(), raw(rows < 0),
                         raw(p.features.index_select(0, kept)), raw(p.crop[kept]),
                         raw(p.row[kept]), raw(p.col[kept])))
