"""`POST /v1/hero/layout`: where a request's kept tokens sit, for the playground's picture.

The selection comes from the pipeline's Prune (`VisionPipeline.prune`: the same checks,
cache and selection as a chat's tokens; the features themselves are not sent), and its
geometry from `hero_core.viz` (`token_boxes`, `tile_boxes`), which `hero prune --viz`
draws. Every box is `[x0, y0, x1, y1]` in fractions of the image.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from hero.vision.v1 import vision_pb2

from hero_core.tiling import TilingSpec, plan_grid
from hero_core.viz import tile_boxes, token_boxes
from services.common.codec import packed_from_layout
from services.vision.config import VisionConfig
from services.vision.openai.images import image_input
from services.vision.openai.responses import accepted_figures
from services.vision.openai.schema import LayoutRequest


def _boxes(boxes: list[tuple[float, float, float, float]]) -> list[list[float]]:
    return [[round(v, 5) for v in box] for box in boxes]


async def prune_request(body: LayoutRequest, config: VisionConfig,
                        request_id: str) -> vision_pb2.PruneRequest:
    """The pipeline's Prune request for `body` (its image fetched when a remote URL)."""
    hero = body.hero
    return vision_pb2.PruneRequest(
        request_id=request_id, image=await image_input(body.image_url, config),
        question=body.question,
        prune=vision_pb2.PruneOptions(method=hero.method if hero else "",
                                      retention=hero.retention if hero else 0.0))


async def selection_layout(pipeline: Any, tiling: TilingSpec, body: LayoutRequest,
                           config: VisionConfig, deadline: float | None,
                           request_id: str) -> dict[str, Any]:
    """The layout object of `body`'s selection (`pipeline`: a `VisionPipeline`)."""
    request = await prune_request(body, config, request_id)
    events = pipeline.prune(request, deadline=deadline, request_id=request_id)
    async with contextlib.aclosing(events):
        accepted = (await anext(events)).accepted
        layout = (await anext(events)).tokens.layout
    # the layout alone: features of width 0, only crop/row/col/grid are read
    packed = packed_from_layout(layout, torch.empty(len(layout.crop), 0))
    grid = plan_grid(packed.image_size, tiling)
    if (grid.rows, grid.cols, grid.side) != (*packed.grid, packed.side):
        raise RuntimeError(f"the layout's grid {packed.grid} is not the tiling's "
                           f"{(grid.rows, grid.cols)}")
    counts = packed.counts_per_crop()
    tiles = [{"tile": i, "box": box, "kept": counts[i]}
             for i, box in enumerate(_boxes(tile_boxes(grid)), start=1)]
    return {"object": "hero.layout",
            "method": (body.hero and body.hero.method) or config.default_method,
            "retention": (body.hero and body.hero.retention) or config.default_retention,
            "hero": accepted_figures(accepted),
            "image": {"width": packed.image_size[1], "height": packed.image_size[0]},
            "grid": {"rows": grid.rows, "cols": grid.cols},
            "tokens_per_side": packed.side,
            "thumbnail": {"kept": counts[0], "of": packed.side * packed.side,
                          "tokens": _boxes(token_boxes(packed, grid, 0))},
            "tiles": tiles,
            "tile_tokens": _boxes(token_boxes(packed, grid, None))}
