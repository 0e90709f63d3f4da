import torch

from hero_core.cache import build_entry, select_from_entry
from hero_core.methods import create_method
from hero_core.tiling import tile_image
from tests.conftest import noise_image


def test_batched_encoding_equals_single_image_encoding(vlm):
    """The encoder's batch of several images gives each the features it gets alone."""
    encoder = vlm.vision_encoder()
    images = [noise_image(480, 640, seed=s) for s in (1, 2)]
    pixels = [tile_image(im, vlm.tiling)[0] for im in images]
    together = encoder.encode(torch.cat(pixels), (11, 22))
    alone = encoder.encode(pixels[0], (11, 22))
    n = pixels[0].shape[0]
    assert torch.allclose(together.features[:n], alone.features, atol=1e-5)
    hero = create_method("hero")
    grid = tile_image(images[0], vlm.tiling)[1]
    a = select_from_entry(build_entry(hero.rank(together.select(slice(0, n)), grid),
                                      together.features[:n], grid, torch.float32), hero, grid,
                          0.111, None)
    b = select_from_entry(build_entry(hero.rank(alone, grid), alone.features, grid,
                                      torch.float32), hero, grid, 0.111, None)
    assert torch.equal(a.crop, b.crop) and torch.equal(a.row, b.row)
