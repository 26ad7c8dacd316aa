"""Super-resolution USE (issue 18; paper Sec. 5): ``pconv.inference.super_resolve`` (LR -> K-times larger composite with
the LR pixels exact at their grid positions, any size, tiles), the task / scale / size checks and their messages,
the CLI ``pipelines/super_resolve.py``, the pyfunc flavour of an SR model, and ``pconv.evaluation.sr`` (PSNR /
SSIM on Y and RGB against bicubic upsampling, on real photos).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pconv.tracking import checkpoints
from pconv.core import images
from pconv.evaluation import sr as sr_evaluation
from pconv.core.config import TrainConfig
from pconv.tracking.loading import ModelInfo, load_model
from pconv.core.unet import build_model
from pconv.inference.pyfunc import BadInput, PConvPyfunc
from pconv.core.sr_grid import take_from_grid
from pconv.inference.super_resolve import check_size, resolve_scale, super_resolve, super_resolve_file

LAYER_SIZE = 4  # tiny net: inputs padded to a multiple of 16


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(LAYER_SIZE).eval()


def save_checkpoint(directory: Path, task: str = "sr", scale: int = 4, seed: int = 0) -> Path:
    """A checkpoint folder as training writes it, of a tiny random net trained (nominally) for ``task``."""
    cfg = TrainConfig(images="x", masks="" if task == "sr" else "y", task=task, sr_scale=scale, image_size=32,
                      layer_size=LAYER_SIZE, run_name="tiny", phase1_steps=1, phase2_steps=0)
    state = {"model": tiny_model(seed).state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "phase": 1,
             "epoch": 0, "data_seed": 0}
    return checkpoints.save(directory, state, cfg.to_yaml(), {"mlflow_run_id": None, "step": 1})


def lr_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("h,w", [(13, 21), (40, 24)])
def test_output_is_k_times_larger_and_keeps_the_lr_pixels_exactly(scale, h, w):
    lr = lr_image(h, w, seed=scale)
    hr = super_resolve(tiny_model(), lr, scale)  # numpy uint8 in -> numpy uint8 out
    assert hr.shape == (h * scale, w * scale, 3) and hr.dtype == np.uint8
    off = scale // 2  # paper Sec. 5: the LR pixel of block (x, y) sits at (Kx + floor(K/2), Ky + floor(K/2))
    np.testing.assert_array_equal(hr[off::scale, off::scale], lr)
    # the holes are the net's, not a copy of the LR image: a nearest-neighbour upsample would also keep the grid
    nearest = np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)
    assert (hr != nearest).mean() > 0.3

    t = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float() / 255.0  # float in -> float out, grid exact
    out = super_resolve(tiny_model(), t[None], scale)
    assert out.shape == (1, 3, h * scale, w * scale) and out.dtype == torch.float32
    torch.testing.assert_close(take_from_grid(out, scale), t[None], rtol=0, atol=0)


def test_tiled_output_keeps_the_grid_and_matches_untiled_away_from_seams():
    lr = lr_image(48, 40, seed=3)
    whole = super_resolve(tiny_model(), lr, 4, max_side=4096)
    tiled = super_resolve(tiny_model(), lr, 4, max_side=64)  # a 192x160 canvas in 64 px tiles
    np.testing.assert_array_equal(tiled[2::4, 2::4], lr)
    assert tiled.shape == whole.shape
    # tiles see less context, so the holes may differ near seams, but the result is a full, sane image
    assert np.abs(tiled.astype(int) - whole.astype(int)).mean() < 40


def test_scale_and_size_checks_name_what_is_wrong():
    info = ModelInfo(image_size=64, layer_size=4, conv="partial", task="sr", sr_scale=4, kind="checkpoint",
                     uri="runs/sr4", source="runs/sr4/checkpoint_000001")
    assert resolve_scale(info, None) == 4 and resolve_scale(info, 4) == 4
    with pytest.raises(ValueError, match="--scale 2 disagrees with the model runs/sr4, which was trained for scale 4"):
        resolve_scale(info, 2)
    with pytest.raises(ValueError, match=r"scale 3 is not supported: use one of \[2, 4\]"):
        resolve_scale(info, 3)
    unscaled = dataclasses.replace(info, sr_scale=None)  # an SR config without sr_scale: the caller must say
    assert resolve_scale(unscaled, 2) == 2
    with pytest.raises(ValueError, match="runs/sr4: its config has no sr_scale; pass --scale"):
        resolve_scale(unscaled, None)
    with pytest.raises(ValueError, match=r"big.png: 100x100 at scale 4 gives a 400x400 output = 160,000 pixels, "
                                         r"above the limit of 100,000"):
        check_size(100, 100, 4, "big.png", limit=100_000)
    check_size(50, 50, 4, "ok.png", limit=100_000)


def test_cli_super_resolves_a_file_and_refuses_bad_requests(tmp_path, capsys):
    import pconv.commands.super_resolve as cli

    model_dir = save_checkpoint(tmp_path / "sr4" / "checkpoint_000001", scale=4)
    lr = lr_image(20, 30, seed=5)
    (tmp_path / "small.png").write_bytes(png(lr))
    out = tmp_path / "out" / "large.png"
    assert cli.main(["--model", str(model_dir), "--image", str(tmp_path / "small.png"), "--out", str(out)]) == 0
    hr = np.asarray(Image.open(out))
    assert hr.shape == (80, 120, 3)
    np.testing.assert_array_equal(hr[2::4, 2::4], lr)
    assert "(30x20)" in capsys.readouterr().out

    small = str(tmp_path / "small.png")
    bad = [(["--scale", "3", "--out", str(out)], "scale 3 is not supported: use one of [2, 4]"),  # before the load
           (["--scale", "2", "--out", str(out)], "disagrees with the model"),
           (["--out", str(tmp_path / "x.jpg")], "lossy"),
           (["--image", str(tmp_path / "missing.png"), "--out", str(out)], "missing.png")]
    for extra, message in bad:
        args = ["--model", str(model_dir), "--image", small, *extra]
        assert cli.main(args) == 2, extra
        assert message in capsys.readouterr().err, extra

    inpainting = save_checkpoint(tmp_path / "inp" / "checkpoint_000001", task="inpainting")
    assert cli.main(["--model", str(inpainting), "--image", str(tmp_path / "small.png"), "--out", str(out)]) == 2
    assert "not a super-resolution model" in capsys.readouterr().err


def test_an_sr_model_is_refused_by_inpainting_with_a_pointer_to_super_resolve(tmp_path):
    from pconv.inference.inpaint import inpaint_files

    model_dir = save_checkpoint(tmp_path / "sr" / "checkpoint_000001", scale=2)
    model, info = load_model(str(model_dir))
    assert (info.task, info.sr_scale) == ("sr", 2)
    (tmp_path / "a.png").write_bytes(png(lr_image(32, 32)))
    (tmp_path / "m.png").write_bytes(png(np.full((32, 32, 3), 255, np.uint8)))
    with pytest.raises(ValueError, match="is a super-resolution model .* use it with pipelines/super_resolve.py"):
        inpaint_files(str(model_dir), str(tmp_path / "a.png"), str(tmp_path / "m.png"), str(tmp_path / "o.png"),
                      hole_color="white")


def test_pyfunc_of_an_sr_model_takes_the_lr_file_only(tmp_path):
    model_dir = save_checkpoint(tmp_path / "sr" / "checkpoint_000001", scale=2)
    model, info = load_model(str(model_dir))
    wrapper = PConvPyfunc(model, info)
    lr = lr_image(17, 9, seed=2)
    out = wrapper.predict(pd.DataFrame({"image": [png(lr)]}))
    hr = np.asarray(Image.open(io.BytesIO(out["image"][0])))
    assert hr.shape == (34, 18, 3)
    np.testing.assert_array_equal(hr[1::2, 1::2], lr)
    with pytest.raises(BadInput, match="super-resolution model .x2.: send only column image"):
        wrapper.predict(pd.DataFrame({"image": [png(lr)], "mask": [png(lr)]}))
    with pytest.raises(BadInput, match="above the limit"):
        PConvPyfunc(model, info, max_pixels=100).predict(pd.DataFrame({"image": [png(lr)]}))


def test_sr_metrics_on_real_photos_bicubic_beats_nearest_and_an_untrained_net(photo_dir):
    hr = [images.center_crop(images.open_image((photo_dir / "scenes" / p.name).read_bytes()), 64)
          for p in sorted((photo_dir / "scenes").glob("*.png"))[:3]]
    perfect = sr_evaluation.score(hr[0], hr[0], 4)
    assert perfect["psnr_y"] == float("inf") or perfect["psnr_y"] > 90
    bicubic = sr_evaluation.evaluate_bicubic(hr, 4).overall()
    nearest = np.mean([sr_evaluation.score(np.repeat(np.repeat(images.downsample(x, 4), 4, 0), 4, 1), x, 4)["psnr_y"]
                       for x in hr])
    assert bicubic["count"] == 3 and 18 < bicubic["psnr_y"] < 40 and bicubic["psnr_y"] > nearest
    assert bicubic["psnr"] == bicubic["psnr_y"]  # the headline is Y (what promotion compares)
    untrained = sr_evaluation.evaluate_sr_model(tiny_model(), hr, 4, batch_size=2).overall()
    assert untrained["psnr_y"] < bicubic["psnr_y"]


def test_sr_evaluation_run_reports_y_headline_and_rejects_bad_sizes(tmp_path, photo_dir):
    model_dir = save_checkpoint(tmp_path / "sr" / "checkpoint_000001", scale=2)
    result = sr_evaluation.run_sr_evaluation(str(model_dir), str(photo_dir / "scenes"), image_size=32, limit=2,
                                             experiment=None)
    assert result["scale"] == 2 and result["images"] == 2 and result["headline"] == "psnr_y"
    assert "Headline: PSNR on Y" in result["markdown"] and "bicubic upsampling (Pillow)" in result["markdown"]
    # the table names its protocol (issue 25 item 2), and shows both outputs of both methods
    assert result["protocol"] == "lr-pasted" and "Protocol: lr-pasted (" in result["markdown"]
    for method in ("model: ", "bicubic upsampling (Pillow)"):
        for output in ("LR pasted (headline)", "raw"):
            assert sum(line.startswith(f"| {method}") and f" | {output} | " in line
                       for line in result["markdown"].splitlines()) == 1, (method, output)
    assert {"raw_psnr_y", "psnr_y"} <= set(result["baseline"]["overall"]) & set(result["model"]["overall"])
    assert result["model"]["overall"]["count"] == 2 and result["baseline"]["overall"]["count"] == 2
    with pytest.raises(ValueError, match="must be a multiple of the scale 2"):
        sr_evaluation.run_sr_evaluation(str(model_dir), str(photo_dir / "scenes"), image_size=33, experiment=None)
    with pytest.raises(ValueError, match="needs a registered model"):
        sr_evaluation.run_sr_evaluation(str(model_dir), str(photo_dir / "scenes"), promote_alias="champion",
                                        experiment=None)
    inpainting = save_checkpoint(tmp_path / "inp" / "checkpoint_000001", task="inpainting")
    with pytest.raises(ValueError, match="not a super-resolution model"):
        sr_evaluation.run_sr_evaluation(str(inpainting), str(photo_dir / "scenes"), image_size=32, experiment=None)


def test_streamed_sr_evaluation_equals_the_in_memory_one_and_counts_unreadable_files(tmp_path, photo_dir):
    from pconv.evaluation.inputs import load_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((photo_dir / "scenes").glob("*.png"))[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "0_broken.png").write_bytes(b"not a png")
    skipped: list[str] = []
    keys, hr = load_images(str(folder), 32, None, [])
    table, base, streamed_keys = sr_evaluation.evaluate_stream(str(folder), 32, None, 2, tiny_model(), True,
                                                                batch_size=2, skipped=skipped)
    assert streamed_keys == keys and len(keys) == 5
    assert len(skipped) == 1 and "0_broken.png" in skipped[0]
    memory = sr_evaluation.evaluate_sr_model(tiny_model(), hr, 2, batch_size=2).overall()
    for name in sr_evaluation.SR_METRICS:
        assert table.overall()[name] == pytest.approx(memory[name], rel=1e-6)
        assert base.overall()[name] == pytest.approx(sr_evaluation.evaluate_bicubic(hr, 2).overall()[name])
    # --limit 2 takes the first two LISTED files (sorted keys): the broken one and one photo, nothing more is read
    _, _, first_two = sr_evaluation.evaluate_stream(str(folder), 32, 2, 2, None, True)
    assert first_two == keys[:1]


class RecordingNet(torch.nn.Module):
    """A net that records every (image, mask) it is called with, then runs the tiny net on it."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.layer_size = net.layer_size
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        self.calls.append((image.detach().clone(), mask.detach().clone()))
        return self.net(image, mask)


def coded_lr(h: int, w: int) -> torch.Tensor:
    """A float LR image whose pixel (i, j) says where it is: red (i + 1) / 1024, green (j + 1) / 1024 (exact)."""
    i = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / 1024
    j = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / 1024
    return torch.stack([i, j, torch.full((h, w), 0.5)])[None]


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("h,w", [(13, 21), (9, 9), (10, 14), (12, 8)])
@pytest.mark.parametrize("max_side", [4096, 32])
def test_every_known_pixel_the_net_sees_is_on_the_training_grid(scale, h, w, max_side):
    """Issue 25 item 1: training shows the net LR pixel (i, j) at (K i + K//2, K j + K//2) of its input. Every net
    input of super_resolve (whole canvases, padded to the net's multiple, and tiles when the canvas is larger than
    max_side) must do the same: each known pixel at a position = K//2 (mod K) in both axes, all of them one
    translation of the canvas (no mirrored or replicated LR pixel in the padding), and exactly the LR pixels the input
    covers (nothing padded is marked known)."""
    net = RecordingNet(tiny_model())
    lr = coded_lr(h, w)
    out = super_resolve(net, lr, scale, max_side=max_side)
    assert out.shape == (1, 3, h * scale, w * scale)
    assert net.calls and (max(h, w) * scale <= max_side or len(net.calls) > 1)  # tiled when larger
    off = scale // 2
    for image, mask in net.calls:
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        ys, xs = torch.nonzero(mask[0, 0] == 1, as_tuple=True)
        assert len(ys) > 0
        assert set((ys % scale).tolist()) == {off} and set((xs % scale).tolist()) == {off}, "off the training grid"
        i = (image[0, 0, ys, xs] * 1024).round().long() - 1  # which LR pixel each known pixel is
        j = (image[0, 1, ys, xs] * 1024).round().long() - 1
        dy, dx = set((scale * i + off - ys).tolist()), set((scale * j + off - xs).tolist())
        assert len(dy) == 1 and len(dx) == 1, "a known pixel that is not a translation of the canvas (padding)"
        top, left = dy.pop(), dx.pop()  # the input's corner on the canvas: the LR pixels it covers, all of them
        rows = [a for a in range(h) if 0 <= scale * a + off - top < mask.shape[-2]]
        cols = [b for b in range(w) if 0 <= scale * b + off - left < mask.shape[-1]]
        assert len(ys) == len(rows) * len(cols), "a padded pixel is marked known"
    torch.testing.assert_close(take_from_grid(out, scale), lr, rtol=0, atol=0)


def test_model_and_bicubic_are_scored_alike_raw_and_with_the_lr_pixels_pasted(photo_dir):
    """Issue 25 item 2: the SR protocol scores BOTH methods as their raw output and as the composite with the LR
    pixels pasted at the grid (the same paste); the model's pasted composite is what inference returns and is the
    headline. The old evaluation pasted the LR pixels into the model's output only."""
    scale, off = 2, 1
    hr = [images.center_crop(images.open_image(p.read_bytes()), 48)
          for p in sorted((photo_dir / "scenes").glob("*.png"))[:3]]
    lr = [images.downsample(x, scale) for x in hr]

    def pasted(up: np.ndarray, small: np.ndarray) -> np.ndarray:
        out = up.copy()
        out[off::scale, off::scale] = small
        return out

    def mean(preds: list[np.ndarray], name: str) -> float:
        return float(np.mean([sr_evaluation.score(p, x, scale)[name] for p, x in zip(preds, hr)]))

    bicubic = sr_evaluation.evaluate_bicubic(hr, scale).overall()
    raw = [sr_evaluation.bicubic_upsample(small, scale) for small in lr]
    assert bicubic["psnr_y"] == pytest.approx(mean([pasted(up, small) for up, small in zip(raw, lr)], "psnr_y"))
    assert bicubic["raw_psnr_y"] == pytest.approx(mean(raw, "psnr_y"))
    assert bicubic["psnr"] == bicubic["psnr_y"] != pytest.approx(bicubic["raw_psnr_y"])  # the paste matters at x2

    net = tiny_model()
    model = sr_evaluation.evaluate_sr_model(net, hr, scale, batch_size=2).overall()
    returned = [super_resolve(net, small, scale) for small in lr]  # what every use of the model returns
    unpasted = [super_resolve(net, small, scale, paste=False) for small in lr]
    for out, bare, small in zip(returned, unpasted, lr):
        np.testing.assert_array_equal(out, pasted(bare, small))  # raw and pasted differ by the paste only
    assert model["psnr_y"] == pytest.approx(mean(returned, "psnr_y"))
    assert model["raw_psnr_y"] == pytest.approx(mean(unpasted, "psnr_y"))
    assert model["psnr_y"] != pytest.approx(model["raw_psnr_y"])
