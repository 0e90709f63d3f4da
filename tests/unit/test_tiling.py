import pytest
import torch
from transformers import LlavaNextImageProcessorPil
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.modeling_llava_next import unpad_image

from hero_core.tiling import TilingSpec, plan_grid, select_best_resolution, tile_image
from tests.conftest import noise_image

SIZES = [(480, 640), (337, 673), (673, 337), (300, 1000), (1001, 299), (50, 50),
         (2000, 1999), (17, 900), (335, 671), (1, 1), (999, 333)]


@pytest.fixture(scope="module")
def processor():
    return LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                      crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_tiles_are_pixel_identical_to_the_transformers_processor(processor, height, width):
    image = noise_image(height, width, seed=height * 7 + width)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    pixels, grid = tile_image(image, TilingSpec())
    assert pixels.shape == expected.shape
    assert torch.equal(pixels, expected)
    assert pixels.shape[0] == grid.num_crops


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_best_grid_matches_transformers(height, width):
    spec = TilingSpec()
    assert select_best_resolution((height, width), spec.grid_pinpoints) == hf_best(
        [height, width], [list(p) for p in spec.grid_pinpoints])


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_valid_mask_matches_unpad_image(height, width):
    grid = plan_grid((height, width), TilingSpec())
    side = grid.side
    # Label every stitched-grid position, unpad it the stock way, compare survivors.
    labels = torch.arange(grid.rows * side * grid.cols * side, dtype=torch.float32)
    labels = labels.view(1, grid.rows * side, grid.cols * side)
    kept = set(unpad_image(labels, [height, width]).flatten().long().tolist())
    mask = grid.valid_mask()[1:]
    ours = set()
    for tile in range(1, grid.num_crops):
        r0, c0 = grid.tile_origin(tile)
        for idx in torch.nonzero(mask[tile - 1]).flatten().tolist():
            ours.add((r0 + idx // side) * grid.cols * side + c0 + idx % side)
    assert ours == kept
    assert grid.full_token_count == side * side + len(kept) + (grid.window[1] - grid.window[0])


def test_full_token_count_matches_processor_placeholder_count(tiny_dir):
    from transformers import AutoTokenizer, LlavaNextProcessor

    llava = tiny_dir / "llava"
    proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(llava),
                              tokenizer=AutoTokenizer.from_pretrained(llava), patch_size=14,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    for height, width in SIZES:
        grid = plan_grid((height, width), TilingSpec())
        n = proc._get_num_multimodal_tokens([(height, width)])["num_image_tokens"][0]
        assert grid.full_token_count == n


def test_thumbnail_tile_map_covers_every_tile_in_two_dimensions():
    grid = plan_grid((700, 700), TilingSpec())  # 2x2
    tile_of = grid.thumbnail_tile_map().view(grid.side, grid.side)
    assert tile_of[0, 0] == 1 and tile_of[0, -1] == 2
    assert tile_of[-1, 0] == 3 and tile_of[-1, -1] == 4
    assert set(tile_of.flatten().tolist()) == {1, 2, 3, 4}
