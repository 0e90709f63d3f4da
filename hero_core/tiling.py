"""LLaVA-NeXT "AnyRes" tiling: thumbnail + grid tiles, and the unpad geometry.

Mirrors `LlavaNextImageProcessorPil` pixel for pixel (best-grid selection, aspect-
preserving bicubic resize, centred zero padding, 336-pixel tiles, a squashed
thumbnail first) and `unpad_image` of the LLaVA-NeXT model token for token, so
that packing at retention 1.0 reproduces the stock model's features exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from hero_core.config import require
from hero_core.image import to_rgb

LLAVA_V16_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008),
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TilingSpec:
    """How images are cut for one model; read from the checkpoint's processor config."""

    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_V16_PINPOINTS
    """Candidate canvas sizes (height, width) in pixels; the best fit is chosen per image."""
    crop_size: int = 336
    """Side of every crop (thumbnail and tiles) in pixels."""
    patch_size: int = 14
    """ViT patch side in pixels; crop_size // patch_size tokens per crop side."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    """PIL resampling filter used for every resize."""
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        require(len(self.grid_pinpoints) > 0, "TilingSpec.grid_pinpoints must not be empty")
        require(self.crop_size % self.patch_size == 0, "crop_size must be a multiple of patch_size")
        for h, w in self.grid_pinpoints:
            require(h % self.crop_size == 0 and w % self.crop_size == 0,
                    f"grid pinpoint {(h, w)} is not a multiple of crop_size={self.crop_size}")

    @property
    def side(self) -> int:
        """Tokens per crop side (24 for CLIP-ViT-L/14-336)."""
        return self.crop_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Geometry of one tiled image: canvas, grid, padding and the unpadded token window."""

    image_size: tuple[int, int]
    """Original (height, width) in pixels."""
    rows: int
    cols: int
    side: int
    """Tokens per crop side."""
    crop_size: int
    resized_size: tuple[int, int]
    """(height, width) of the image on the canvas before padding."""
    pad_offset: tuple[int, int]
    """(top, left) zero padding on the canvas, in pixels."""
    window: tuple[int, int, int, int]
    """Unpadded token window (row0, row1, col0, col1) of the stitched tile grid."""

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def num_crops(self) -> int:
        """Thumbnail plus tiles."""
        return self.num_tiles + 1

    @property
    def tokens_per_crop(self) -> int:
        return self.side * self.side

    @property
    def full_token_count(self) -> int:
        """Visual tokens stock LLaVA-NeXT feeds the LLM: thumbnail + unpadded grid + newlines."""
        r0, r1, c0, c1 = self.window
        return self.tokens_per_crop + (r1 - r0) * (c1 - c0) + (r1 - r0)

    def tile_origin(self, tile: int) -> tuple[int, int]:
        """Global (row, col) token offset of tile `tile` (1-based; 0 is the thumbnail)."""
        return ((tile - 1) // self.cols) * self.side, ((tile - 1) % self.cols) * self.side

    def valid_mask(self) -> torch.Tensor:
        """Which tokens survive unpadding, `(K+1, side*side)` bool; the thumbnail is all valid."""
        r0, r1, c0, c1 = self.window
        grid = torch.zeros(self.rows * self.side, self.cols * self.side, dtype=torch.bool)
        grid[r0:r1, c0:c1] = True
        tiles = grid.view(self.rows, self.side, self.cols, self.side).permute(0, 2, 1, 3)
        thumb = torch.ones(1, self.tokens_per_crop, dtype=torch.bool)
        return torch.cat([thumb, tiles.reshape(self.num_tiles, -1)])

    def thumbnail_tile_map(self) -> torch.Tensor:
        """For each thumbnail token, the tile (1..K) whose canvas region holds its centre,
        `(side*side,)` long. The thumbnail shows the whole image, so every token maps."""
        (h, w), (top, left) = self.resized_size, self.pad_offset
        centres = (torch.arange(self.side, dtype=torch.float64) + 0.5) / self.side
        ys = torch.floor((centres * h + top) / self.crop_size).long().clamp(0, self.rows - 1)
        xs = torch.floor((centres * w + left) / self.crop_size).long().clamp(0, self.cols - 1)
        return (ys[:, None] * self.cols + xs[None, :] + 1).reshape(-1)


def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The candidate canvas (h, w) that keeps the most pixels, then wastes the fewest."""
    height, width = size
    best, best_effective, best_waste = candidates[0], -1, math.inf
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_h * cand_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_h, cand_w), effective, waste
    return best


def fit_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving (h, w) of `size` scaled to fit inside `canvas`."""
    (height, width), (target_h, target_w) = size, canvas
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_window(
    image_size: tuple[int, int], grid_rows: int, grid_cols: int
) -> tuple[int, int, int, int]:
    """Token window (row0, row1, col0, col1) left after LLaVA-NeXT's `unpad_image`."""
    height, width = image_size
    if width / height > grid_cols / grid_rows:
        new_rows = int(round(height * (grid_cols / width), 7))
        pad = (grid_rows - new_rows) // 2
        return pad, grid_rows - pad, 0, grid_cols
    new_cols = int(round(width * (grid_rows / height), 7))
    pad = (grid_cols - new_cols) // 2
    return 0, grid_rows, pad, grid_cols - pad


def plan_grid(image_size: tuple[int, int], spec: TilingSpec) -> TileGrid:
    """The tile grid an image of `image_size` (h, w) gets, without touching pixels."""
    canvas = select_best_resolution(image_size, spec.grid_pinpoints)
    resized = fit_size(image_size, canvas)
    top = (canvas[0] - resized[0]) // 2
    left = (canvas[1] - resized[1]) // 2
    rows, cols = canvas[0] // spec.crop_size, canvas[1] // spec.crop_size
    window = unpad_window(image_size, rows * spec.side, cols * spec.side)
    return TileGrid(image_size, rows, cols, spec.side, spec.crop_size, resized, (top, left), window)


def tile_image(image: Image.Image, spec: TilingSpec) -> tuple[torch.Tensor, TileGrid]:
    """Cut an RGB image into normalised crops.

    Returns pixel values `(K+1, 3, crop, crop)` float32, thumbnail first, tiles in
    raster order, and the grid geometry.
    """
    image = to_rgb(image)
    grid = plan_grid((image.height, image.width), spec)
    resample = Image.Resampling(spec.resample)
    canvas = np.zeros((grid.rows * spec.crop_size, grid.cols * spec.crop_size, 3), np.uint8)
    (h, w), (top, left) = grid.resized_size, grid.pad_offset
    canvas[top:top + h, left:left + w] = np.asarray(image.resize((w, h), resample=resample))
    crops = [np.asarray(image.resize((spec.crop_size, spec.crop_size), resample=resample))]
    for r in range(grid.rows):
        for c in range(grid.cols):
            y, x = r * spec.crop_size, c * spec.crop_size
            crops.append(canvas[y:y + spec.crop_size, x:x + spec.crop_size])
    return normalize_crops(np.stack(crops), spec), grid


def normalize_crops(crops: np.ndarray, spec: TilingSpec) -> torch.Tensor:
    """uint8 `(N, H, W, 3)` -> float32 `(N, 3, H, W)` with the processor's exact arithmetic."""
    scaled = (crops.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(0, 3, 1, 2)))
