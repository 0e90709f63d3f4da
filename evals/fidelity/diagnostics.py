"""Where the CLS token looks at each depth: the evidence behind L_obj and L_art.

HERO's second finding is that CLS attention covers foreground objects in low-to-middle
layers and collapses onto a few high-attention background ("artifact") tokens in
later ones. On the mosaics the shape's patches are known, so both halves can be
measured per layer: the share of CLS attention on object patches, and how many
tokens pass HERO's artifact test (attention >= `artifact_factor` x the mean).
"""

from __future__ import annotations

from evals.fidelity.features import CropTable, EncodedSplit


def attention_by_depth(table: CropTable, split: EncodedSplit,
                       artifact_factor: float = 10.0) -> list[dict[str, float]]:
    """Per layer: CLS attention share on object patches (tiles with a shape, thumbnails),
    the object patches' share of the area, artifact-token counts (and which share of the
    thumbnail's lie on a shape) and the top-1 share."""
    attention = table.attention[split.rows]  # (M, K+1, L, T)
    attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-12)
    objects = split.object_patches.float()  # (M, K+1, T)
    shape_tiles = objects[:, 1:].sum(-1) > 0  # (M, K)
    area = float(objects[:, 1:].sum(-1)[shape_tiles].mean()) / objects.shape[-1]
    rows = []
    for layer in range(attention.shape[2]):
        a = attention[:, :, layer]  # (M, K+1, T)
        on_objects = (a * objects).sum(-1)  # (M, K+1)
        is_artifact = a >= artifact_factor * a.mean(-1, keepdim=True)  # (M, K+1, T)
        artifacts = is_artifact.sum(-1).float()
        on_shapes = (is_artifact[:, 0] & (objects[:, 0] > 0)).sum() / artifacts[:, 0].sum()
        rows.append({
            "layer": float(layer),
            "tile_object_share": float(on_objects[:, 1:][shape_tiles].mean()),
            "tile_object_area": area,
            "thumb_object_share": float(on_objects[:, 0].mean()),
            "thumb_artifacts": float(artifacts[:, 0].mean()),
            "thumb_artifacts_on_shapes": float(on_shapes.nan_to_num(0.0)),
            "tile_artifacts": float(artifacts[:, 1:].mean()),
            "top1_share": float(a.max(-1).values.mean()),
        })
    return rows
