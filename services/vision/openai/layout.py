"""`POST /v1/hero/layout`: where a request's kept tokens sit, for the playground's picture.

The selection comes from the pipeline (`VisionPipeline.selection`: Prune's checks, and
the same cache and selection as a chat's tokens; no features are encoded), and its
geometry from `hero_core.viz` (`token_boxes`, `tile_boxes`), which `hero prune --viz`
draws. Every box is `[x0, y0, x1, y1]` in fractions of the image.
"""

from __future__ import annotations

from typing import Any

from hero.vision.v1 import vision_pb2

from hero_core.tiling import TilingSpec, plan_grid
from hero_core.viz import tile_boxes, token_boxes
from services.vision.config import VisionConfig
from services.vision.openai.convert import prune_options
from services.vision.openai.images import image_input
from services.vision.openai.responses import accepted_figures
from services.vision.openai.schema import LayoutRequest
from services.vision.pipeline import accepted


def _boxes(boxes: list[tuple[float, float, float, float]]) -> list[list[float]]:
    return [[round(v, 5) for v in box] for box in boxes]


async def prune_request(body: LayoutRequest, config: VisionConfig,
                        request_id: str) -> vision_pb2.PruneRequest:
    """The pipeline's Prune request for `body` (its image fetched when a remote URL)."""
    return vision_pb2.PruneRequest(
        request_id=request_id, image=await image_input(body.image_url, config),
        question=body.question, prune=prune_options(body.hero))


async def selection_layout(pipeline: Any, tiling: TilingSpec, body: LayoutRequest,
                           config: VisionConfig, deadline: float | None,
                           request_id: str) -> dict[str, Any]:
    """The layout object of `body`'s selection (`pipeline`: a `VisionPipeline`)."""
    request = await prune_request(body, config, request_id)
    tokens = await pipeline.selection(request, deadline=deadline)
    packed = tokens.packed
    grid = plan_grid(packed.image_size, tiling)
    counts = packed.counts_per_crop()
    tiles = [{"tile": i, "box": box, "kept": counts[i]}
             for i, box in enumerate(_boxes(tile_boxes(grid)), start=1)]
    return {"object": "hero.layout",
            "method": (body.hero and body.hero.method) or config.default_method,
            "retention": (body.hero and body.hero.retention) or config.default_retention,
            "hero": accepted_figures(accepted(tokens)),
            "image": {"width": packed.image_size[1], "height": packed.image_size[0]},
            "grid": {"rows": grid.rows, "cols": grid.cols},
            "tokens_per_side": packed.side,
            "thumbnail": {"kept": counts[0], "of": packed.side * packed.side,
                          "tokens": _boxes(token_boxes(packed, grid, 0))},
            "tiles": tiles,
            "tile_tokens": _boxes(token_boxes(packed, grid, None))}
