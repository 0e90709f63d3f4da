"""Packing kept tokens into the compact structure that travels and is cached.

`PackedTokens` holds **pre-projector** features (e.g. 1024-d for CLIP-L) of the kept
tokens in LLaVA-NeXT order (thumbnail in raster order, then the stitched, unpadded
tile grid in raster order) plus their layout. `embed_packed` turns it into the
LLM's image embeddings (projector, one `image_newline` after each grid row that
keeps a token), and `merge_with_prompt` places them at the prompt's image tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hero_core.errors import LayoutError
from hero_core.tiling import TileGrid


@dataclasses.dataclass
class Selection:
    """What a pruning method keeps: per crop (thumbnail first) the token indices.

    `indices[i]` is `(n_i,)` long in `0..side*side-1`, unique, any order. Methods that
    synthesise tokens (VisionZip's merged context) put their features in
    `features[i]` `(n_i, D)`; otherwise `features[i]` is None and the crop's own
    features are gathered.
    """

    indices: list[torch.Tensor]
    features: list[torch.Tensor | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.features:
            self.features = [None] * len(self.indices)

    @property
    def counts(self) -> list[int]:
        return [int(i.numel()) for i in self.indices]

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclasses.dataclass
class PackedTokens:
    """Kept visual tokens of one image, pre-projector, in the LLM's order."""

    features: torch.Tensor
    """`(N, D)` pre-projector features."""
    crop: torch.Tensor
    """`(N,)` int16: 0 = thumbnail, 1..K = tile in raster order."""
    row: torch.Tensor
    """`(N,)` int16: token row within its crop (0..side-1)."""
    col: torch.Tensor
    """`(N,)` int16: token column within its crop."""
    newline_after: torch.Tensor
    """`(N,)` bool: an `image_newline` embedding follows this token."""
    image_size: tuple[int, int]
    """Original (height, width) in pixels."""
    grid: tuple[int, int]
    """Tile grid (rows, cols)."""
    side: int
    """Tokens per crop side."""
    full_tokens: int
    """Visual tokens the unpruned model would have used (newlines included)."""

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_embeddings(self) -> int:
        """Length of the LLM image sequence: kept tokens plus newlines."""
        return self.num_tokens + int(self.newline_after.sum())

    def counts_per_crop(self) -> list[int]:
        """Kept tokens per crop, thumbnail first."""
        crops = self.grid[0] * self.grid[1] + 1
        return torch.bincount(self.crop.long(), minlength=crops).tolist()


def pack_tokens(selection: Selection, features: torch.Tensor | None,
                grid: TileGrid) -> PackedTokens:
    """Order the kept tokens the way LLaVA-NeXT feeds them to the LLM.

    features: `(K+1, side*side, D)` pre-projector features of all crops, or None when
    the selection carries every crop's features itself.
    At full retention the result equals the stock model's packing, newlines included.
    """
    side = grid.side
    parts_feat, parts_crop, parts_pos, parts_key = [], [], [], []
    width = grid.cols * side
    for crop, index in enumerate(selection.indices):
        index = index.to(torch.long).cpu()
        feats = selection.features[crop]
        if feats is None:
            if features is None:
                raise ValueError(f"crop {crop} has no features in the selection")
            feats = features[crop, index.to(features.device)]
        rows, cols = index // side, index % side
        if crop == 0:
            key = index - grid.tokens_per_crop  # thumbnail first, raster order
        else:
            r0, c0 = grid.tile_origin(crop)
            key = (rows + r0) * width + (cols + c0)
        parts_feat.append(feats)
        parts_crop.append(torch.full_like(index, crop))
        parts_pos.append(torch.stack([rows, cols], 1))
        parts_key.append(key)
    key = torch.cat(parts_key)
    order = torch.sort(key, stable=True).indices
    key, crop_ids = key[order], torch.cat(parts_crop)[order]
    pos = torch.cat(parts_pos)[order]
    global_row = torch.where(crop_ids > 0, key // width, -1)
    # A newline ends every stitched-grid row that keeps at least one token.
    last_in_row = torch.ones_like(global_row, dtype=torch.bool)
    last_in_row[:-1] = global_row[1:] != global_row[:-1]
    stacked = torch.cat(parts_feat)
    return PackedTokens(
        features=stacked[order.to(stacked.device)],
        crop=crop_ids.to(torch.int16), row=pos[:, 0].to(torch.int16),
        col=pos[:, 1].to(torch.int16), newline_after=last_in_row & (crop_ids > 0),
        image_size=grid.image_size, grid=(grid.rows, grid.cols), side=side,
        full_tokens=grid.full_token_count,
    )


def embed_packed(packed: PackedTokens, projector: nn.Module,
                 image_newline: torch.Tensor) -> torch.Tensor:
    """LLM input embeddings `(N + newlines, H)` for packed tokens: projector, then newlines."""
    param = image_newline
    projected: torch.Tensor = projector(packed.features.to(param.device, param.dtype))
    newline = packed.newline_after.to(param.device)
    shift = torch.cumsum(newline.long(), 0) - newline.long()
    token_pos = torch.arange(packed.num_tokens, device=param.device) + shift
    out = projected.new_empty(packed.num_embeddings, projected.shape[-1])
    out[token_pos] = projected
    out[token_pos[newline] + 1] = image_newline.to(projected.dtype)
    return out


def expand_image_token(input_ids: torch.Tensor, image_token_id: int,
                       count: int) -> torch.Tensor:
    """Replace the single image placeholder in `(T,)` ids with `count` copies."""
    where = (input_ids == image_token_id).nonzero().flatten()
    if where.numel() != 1:
        raise LayoutError(f"the prompt must hold exactly one image placeholder, found "
                          f"{where.numel()}")
    i = int(where[0])
    fill = input_ids.new_full((count,), image_token_id)
    return torch.cat([input_ids[:i], fill, input_ids[i + 1:]])


def merge_with_prompt(input_ids: torch.Tensor, image_embeds: torch.Tensor,
                      embed_tokens: nn.Module, image_token_id: int) -> torch.Tensor:
    """Prompt embeddings `(1, T, H)` with image embeddings `(M, H)` at the image tokens.

    input_ids: `(1, T)` holding exactly M image tokens (see `expand_image_token`).
    """
    mask = input_ids == image_token_id
    if int(mask.sum()) != image_embeds.shape[0]:
        raise LayoutError(f"prompt has {int(mask.sum())} image tokens but "
                          f"{image_embeds.shape[0]} image embeddings were given")
    embeds: torch.Tensor = embed_tokens(input_ids)
    mask3 = mask.unsqueeze(-1).expand_as(embeds)
    merged: torch.Tensor = embeds.masked_scatter(mask3, image_embeds.to(embeds.dtype))
    return merged


def layout_keys(packed: PackedTokens, grid: TileGrid) -> torch.Tensor:
    """Sort key `(N,)` of every token in LLaVA-NeXT order (thumbnail keys are negative)."""
    crop, row, col = packed.crop.long(), packed.row.long(), packed.col.long()
    width = grid.cols * grid.side
    origin_r = ((crop - 1).clamp_min(0) // grid.cols) * grid.side
    origin_c = ((crop - 1).clamp_min(0) % grid.cols) * grid.side
    tile_key = (row + origin_r) * width + (col + origin_c)
    thumb_key = row * grid.side + col - grid.tokens_per_crop
    return torch.where(crop == 0, thumb_key, tile_key)


def check_packed(packed: PackedTokens, grid: TileGrid, feature_dim: int) -> None:
    """Raise `LayoutError` unless `packed` is exactly what `pack_tokens` makes for `grid`.

    Checks the feature width, the grid (against the image size), that every token
    is inside its crop and the unpadded window, that tokens are unique and in
    LLaVA-NeXT order, and that newlines sit after the last token of each grid row.
    """
    n = packed.num_tokens
    if packed.features.dim() != 2 or packed.features.shape[1] != feature_dim:
        raise LayoutError(f"features must be (tokens, {feature_dim}) for this model, got "
                          f"{tuple(packed.features.shape)}")
    if n == 0:
        raise LayoutError("no visual tokens were sent; keep at least one")
    for name in ("crop", "row", "col", "newline_after"):
        if tuple(getattr(packed, name).shape) != (n,):
            raise LayoutError(f"layout.{name} must have one entry per token ({n})")
    if packed.side != grid.side or packed.grid != (grid.rows, grid.cols):
        raise LayoutError(f"a {packed.image_size[0]}x{packed.image_size[1]} image has a "
                          f"{grid.rows}x{grid.cols} grid of {grid.side}-token crops on this model,"
                          f" not {packed.grid[0]}x{packed.grid[1]} of {packed.side}")
    if packed.full_tokens != grid.full_token_count:
        raise LayoutError(f"full_tokens must be {grid.full_token_count} for this image, "
                          f"got {packed.full_tokens}")
    crop, row, col = packed.crop.long(), packed.row.long(), packed.col.long()
    if int(crop.min()) < 0 or int(crop.max()) >= grid.num_crops:
        raise LayoutError(f"crop indices must be in 0..{grid.num_crops - 1}")
    if min(int(row.min()), int(col.min())) < 0 or max(int(row.max()), int(col.max())) >= grid.side:
        raise LayoutError(f"row and col must be in 0..{grid.side - 1}")
    valid = grid.valid_mask()[crop, row * grid.side + col]
    if not bool(valid.all()):
        raise LayoutError("a token lies in the letterbox padding that unpadding removes")
    keys = layout_keys(packed, grid)
    if n > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise LayoutError("tokens must be unique and in order: thumbnail in raster order, "
                          "then the stitched tile grid in raster order")
    global_row = torch.where(crop > 0, keys // (grid.cols * grid.side), -1)
    expected = torch.ones(n, dtype=torch.bool)
    expected[:-1] = global_row[1:] != global_row[:-1]
    if not torch.equal(packed.newline_after.bool(), expected & (crop > 0)):
        raise LayoutError("newline_after must mark the last kept token of each tile-grid row")
