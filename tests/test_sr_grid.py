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
    # the data pipeline's numpy form (its workers load no torch) is the same grid
    assert torch.equal(torch.from_numpy(sr_grid.grid_mask(h, w, scale)), mask[0, 0].to(torch.uint8))


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


@pytest.mark.parametrize("scale", [2, 4])
def test_the_downsampler_centres_an_lr_pixel_half_a_pixel_before_the_grid_for_even_k(scale):
    """What the module doc says: Pillow's bicubic downsampling (the SR degradation, pconv.core.images.downsample)
    centres LR pixel x at HR position K*x + K/2 - 0.5 (a linear ramp keeps its value there), while the paper's grid
    puts it at K*x + floor(K/2): for even K half an HR pixel further."""
    import numpy as np

    from pconv.core import images

    ramp = np.broadcast_to((2 * np.arange(64))[None, :, None], (16, 64, 3)).astype(np.uint8)  # value 2 * column
    lr = images.downsample(np.ascontiguousarray(ramp), scale)[1, 2:-2, 0].astype(float)  # away from the borders
    columns = scale * np.arange(2, 64 // scale - 2)
    np.testing.assert_allclose(lr / 2, columns + scale / 2 - 0.5, atol=0.25)  # the block centre
    assert np.all(np.abs(lr / 2 - (columns + sr_grid.grid_offset(scale))) >= 0.5 - 1e-9)  # not the grid position
