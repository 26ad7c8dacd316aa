"""The paper's SR grid (Sec. 5): exact positions, counts, and the round trip LR -> canvas -> LR."""

import pytest
import torch

from pconv.core import sr_grid
@pytest.mark.parametrize("scale", [2, 4])
def test_grid_holds_one_valid_pixel_per_lr_pixel_at_the_offset(scale):
    h, w = 8 * scale, 5 * scale
    mask = sr_grid.sr_grid(h, w, scale)
    assert mask.shape == (1, 1, h, w)
    assert int(mask.sum()) == (h // scale) * (w // scale)
    ys, xs = torch.nonzero(mask[0, 0], as_tuple=True)
    assert set((ys % scale).tolist()) == {scale // 2}
    assert set((xs % scale).tolist()) == {scale // 2}


@pytest.mark.parametrize("scale", [2, 4])
def test_place_and_take_round_trip_exactly(scale):
    lr = torch.rand(2, 3, 6, 7)
    canvas, mask = sr_grid.place_on_grid(lr, scale)
    assert canvas.shape == (2, 3, 6 * scale, 7 * scale) and mask.shape == (2, 1, 6 * scale, 7 * scale)
    assert torch.equal(sr_grid.take_from_grid(canvas, scale), lr)
    assert torch.equal(canvas * (1 - mask), torch.zeros_like(canvas))  # holes carry nothing
    # the LR pixel (x=1, y=2) lands at (K*1 + K//2, K*2 + K//2)
    off = scale // 2
    assert torch.equal(canvas[:, :, 2 * scale + off, 1 * scale + off], lr[:, :, 2, 1])


@pytest.mark.parametrize("bad", [3, 1, 8, 2.5, True])
def test_unsupported_scale_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="not supported"):
        sr_grid.check_scale(bad)


def test_canvas_not_a_multiple_of_the_scale_is_rejected():
    with pytest.raises(ValueError, match="not a positive multiple"):
        sr_grid.sr_grid(10, 12, 4)
