import pytest
import torch

from hero_core.errors import LayoutError
from hero_core.methods import METHODS, create_method
from hero_core.packing import check_packed, pack_tokens
from tests.unit.test_methods import GRIDS, question, synthetic


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_every_method_packs_a_layout_the_check_accepts(name, grid_name):
    crops, grid = synthetic(GRIDS[grid_name], seed=1)
    for ratio in (1.0, 0.111):
        packed = pack_tokens(create_method(name).select(crops, grid, ratio, question(0)),
                             crops.features, grid)
        check_packed(packed, grid, feature_dim=16)


def test_tampered_layouts_are_refused():
    crops, grid = synthetic(GRIDS["2x2"], seed=1)
    packed = pack_tokens(create_method("hero").select(crops, grid, 0.2, None), crops.features,
                         grid)
    swapped = packed.__class__(**{**packed.__dict__, "col": packed.col.flip(0)})
    with pytest.raises(LayoutError):
        check_packed(swapped, grid, 16)
    newline = packed.newline_after.clone()
    newline[0] = ~newline[0]
    with pytest.raises(LayoutError, match="newline"):
        check_packed(packed.__class__(**{**packed.__dict__, "newline_after": newline}), grid, 16)
    with pytest.raises(LayoutError, match=r"\(tokens, 32\)"):
        check_packed(packed, grid, 32)
    duplicated = packed.__class__(**{**packed.__dict__,
                                     "row": torch.zeros_like(packed.row)})
    with pytest.raises(LayoutError):
        check_packed(duplicated, grid, 16)
