"""Pictures of what a method kept: thumbnail tokens on the left, tile tokens over the
full image on the right; dropped areas are dimmed, tile borders drawn.

`token_boxes` and `tile_boxes` are the geometry (fractions of the image): `hero prune
--viz` draws them here, and the vision service's playground page draws the same boxes
(`POST /v1/hero/layout`)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from hero_core.packing import PackedTokens
from hero_core.tiling import TileGrid

PANEL = 512
KEPT_OUTLINE = (255, 200, 0)
TILE_BORDER = (0, 160, 255)


def _panel(image: Image.Image, boxes: list[tuple[float, float, float, float]],
           title: str) -> Image.Image:
    """`image` scaled to fit PANEL, dimmed except inside `boxes` (fractions of the image)."""
    scale = PANEL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * size[0], y0 * size[1], x1 * size[0] - 1, y1 * size[1] - 1], fill=255)
    dimmed = Image.blend(base, Image.new("RGB", size, (0, 0, 0)), 0.75)
    out = Image.composite(base, dimmed, mask)
    canvas = Image.new("RGB", (PANEL, PANEL + 24), (24, 24, 24))
    canvas.paste(out, ((PANEL - size[0]) // 2, 24 + (PANEL - size[1]) // 2))
    ImageDraw.Draw(canvas).text((6, 6), title, fill=(240, 240, 240))
    return canvas


def token_boxes(packed: PackedTokens, grid: TileGrid,
                crop_filter: int | None) -> list[tuple[float, float, float, float]]:
    """Image-fraction boxes of kept tokens; thumbnail only (0) or tiles only (None)."""
    side, boxes = packed.side, []
    (h, w), (top, left) = grid.resized_size, grid.pad_offset
    for crop, row, col in zip(packed.crop.tolist(), packed.row.tolist(), packed.col.tolist(),
                              strict=True):
        if crop_filter == 0 and crop == 0:
            boxes.append((col / side, row / side, (col + 1) / side, (row + 1) / side))
        elif crop_filter is None and crop > 0:
            r0, c0 = grid.tile_origin(crop)
            px = grid.crop_size / side
            y, x = (r0 + row) * px - top, (c0 + col) * px - left
            boxes.append((x / w, y / h, (x + px) / w, (y + px) / h))
    return boxes


def tile_boxes(grid: TileGrid) -> list[tuple[float, float, float, float]]:
    """Image-fraction box of each tile, tile 1 first (raster order), clipped to the image
    (the canvas's padding is not part of it)."""
    (h, w), (top, left) = grid.resized_size, grid.pad_offset
    px = grid.crop_size / grid.side
    boxes = []
    for tile in range(1, grid.num_tiles + 1):
        r0, c0 = grid.tile_origin(tile)
        y0, x0 = r0 * px - top, c0 * px - left
        y1, x1 = y0 + grid.crop_size, x0 + grid.crop_size
        boxes.append((max(x0 / w, 0.0), max(y0 / h, 0.0), min(x1 / w, 1.0), min(y1 / h, 1.0)))
    return boxes


def draw_kept_tokens(image: Image.Image, packed: PackedTokens, grid: TileGrid,
                     title: str = "") -> Image.Image:
    """A side-by-side PNG-ready picture of the kept thumbnail and tile tokens."""
    counts = packed.counts_per_crop()
    left = _panel(image, token_boxes(packed, grid, 0), f"thumbnail: {counts[0]} kept")
    right = _panel(image, token_boxes(packed, grid, None),
                   f"tiles {grid.rows}x{grid.cols}: {sum(counts[1:])} kept  {title}")
    draw = ImageDraw.Draw(right)
    scale = PANEL / max(image.size)
    pw, ph = round(image.width * scale), round(image.height * scale)
    ox, oy = (PANEL - pw) // 2, 24 + (PANEL - ph) // 2
    tiles = tile_boxes(grid)  # the borders between tiles: their top and left edges
    for r in range(1, grid.rows):
        y = oy + tiles[r * grid.cols][1] * ph
        draw.line([(ox, y), (ox + pw, y)], fill=TILE_BORDER, width=2)
    for c in range(1, grid.cols):
        x = ox + tiles[c][0] * pw
        draw.line([(x, oy), (x, oy + ph)], fill=TILE_BORDER, width=2)
    out = Image.new("RGB", (2 * PANEL + 8, PANEL + 24), (0, 0, 0))
    out.paste(left, (0, 0))
    out.paste(right, (PANEL + 8, 0))
    return out
