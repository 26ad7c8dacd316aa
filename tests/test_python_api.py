"""The Python API (`from pconv import Inpainter, SuperResolver`): PIL or numpy in, PIL out, masks with white = hole
by default (diffusers' and LaMa's convention, the same default as the CLI, HTTP and pyfunc edges), the result equal
to the library's tensor path, and `Inpainter.model` the bare network of `pconv export`."""

from __future__ import annotations

import io
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import pconv
from pconv.core.sr_grid import take_from_grid
from pconv.inference.inpaint import inpaint
from test_loading import save_checkpoint, tiny_model
from test_sr_use import save_checkpoint as save_sr_checkpoint

H, W = 120, 168  # not multiples of the tiny net's 16: padding is exercised


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", tiny_model(seed=4), step=2)


@pytest.fixture(scope="module")
def photo_and_hole(datasets_dir) -> tuple[np.ndarray, np.ndarray]:
    """A CBSD68 photo crop and an NVIDIA test mask (white = hole) resized nearest, both H×W."""
    photo = np.asarray(Image.open(sorted((datasets_dir / "cbsd68").glob("*.png"))[5]).convert("RGB"))[:H, :W]
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as masks:
        name = sorted(n for n in masks.namelist() if n.endswith(".png"))[4000]
        hole = np.asarray(Image.open(io.BytesIO(masks.read(name))).convert("L").resize((W, H), Image.NEAREST))
    assert 0.05 < (hole > 127).mean() < 0.6
    return photo, hole


def expected(checkpoint, photo: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The library's tensor path (1 = valid) on the same net."""
    from pconv.tracking.loading import load_model

    net, _ = load_model(str(checkpoint))
    image = torch.from_numpy(photo.transpose(2, 0, 1).astype(np.float32) / 255.0)
    comp = inpaint(net, image, torch.from_numpy((hole <= 127).astype(np.float32))[None])
    return (comp.numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def test_pil_and_numpy_inputs_with_white_holes_by_default(checkpoint, photo_and_hole):
    photo, hole = photo_and_hole
    inpainter = pconv.Inpainter.from_uri(str(checkpoint), device="cpu")
    want = expected(checkpoint, photo, hole)
    by_pil = inpainter(Image.fromarray(photo), Image.fromarray(hole))
    assert isinstance(by_pil, Image.Image) and by_pil.size == (W, H) and by_pil.mode == "RGB"
    assert np.array_equal(np.asarray(by_pil), want)
    assert np.array_equal(np.asarray(inpainter(photo, hole)), want)                       # uint8 arrays
    assert np.array_equal(np.asarray(inpainter(photo.astype(np.float32) / 255.0, hole > 127)), want)  # float, bool
    valid = hole <= 127
    assert np.array_equal(np.asarray(by_pil)[valid], photo[valid]), "valid pixels are the input's"


def test_black_holes_are_an_explicit_option_and_the_wrong_one_warns(checkpoint, photo_and_hole):
    photo, hole = photo_and_hole
    inpainter = pconv.Inpainter.from_uri(str(checkpoint), device="cpu")
    inverted = 255 - hole  # the same holes drawn black
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right polarity: no warning
        by_black = inpainter(photo, inverted, hole_color="black")
    assert np.array_equal(np.asarray(by_black), expected(checkpoint, photo, hole))
    with pytest.warns(UserWarning, match="probably inverted"):
        inpainter(photo, inverted)  # black holes read as white: mostly holes
    with pytest.raises(ValueError, match="hole_color must be one of"):
        inpainter(photo, hole, hole_color="grey")


def test_mismatched_or_unusable_inputs_are_clear_errors(checkpoint, photo_and_hole):
    photo, hole = photo_and_hole
    inpainter = pconv.Inpainter.from_uri(str(checkpoint), device="cpu")
    with pytest.raises(ValueError, match=rf"mask is {W - 8}×{H} but the image is {W}×{H}"):
        inpainter(photo, hole[:, : W - 8])
    with pytest.raises(ValueError, match=r"float array must hold values in \[0, 1\]"):
        inpainter(photo.astype(np.float32), hole)
    with pytest.raises(TypeError, match="expected a PIL image or a numpy array"):
        inpainter(photo.tolist(), hole)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        pconv.Inpainter.from_uri(str(checkpoint.parent / "missing"))


def test_model_is_the_bare_network_of_pconv_export(checkpoint):
    from pconv.tracking.loading import load_model

    inpainter = pconv.Inpainter.from_uri(str(checkpoint), device="cpu")
    net, _ = load_model(str(checkpoint))
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 1, 32, 48, generator=g) > 0.3).float()
    image = torch.rand(2, 3, 32, 48, generator=g) * mask
    with torch.no_grad():
        assert torch.equal(inpainter.model(image, mask), net(image, mask)[0])
    assert inpainter.stride == 16


def test_super_resolver_keeps_the_lr_pixels_and_refuses_an_inpainting_model(tmp_path, checkpoint):
    lr = np.random.default_rng(2).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    resolver = pconv.SuperResolver.from_uri(str(save_sr_checkpoint(tmp_path / "sr", scale=2)), device="cpu")
    hr = resolver(Image.fromarray(lr))
    assert hr.size == (42, 26)
    hr_tensor = torch.from_numpy(np.asarray(hr).transpose(2, 0, 1).copy())
    assert torch.equal(take_from_grid(hr_tensor, 2), torch.from_numpy(lr.transpose(2, 0, 1).copy()))
    with pytest.raises(ValueError, match="inpainting"):
        pconv.SuperResolver.from_uri(str(checkpoint))
    with pytest.raises(ValueError, match="super-resolution|sr"):
        pconv.Inpainter.from_uri(str(tmp_path / "sr"))
