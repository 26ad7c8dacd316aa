"""Super-resolution TRAINING (``task: sr``, issue 18; paper Sec. 5): the pairs the data pipeline builds from an HR
crop (the crop is the truth, the grid mask is exact, ``lr`` is the crop downsampled with Pillow bicubic), the net's
input (the LR canvas, not ``image * mask``), batching-independent rows (what exact resume relies on), the config
keys and their errors, and — end to end on Ray — a tiny SR training through ``pconv.train.driver.run`` that registers
``pconv-sr`` (alias ``candidate``) with its task and scale recorded in the checkpoint, the version's tags and the
model metadata.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pconv.core import images
from pconv.core.config import ConfigError, TrainConfig
from pconv.core.sr_grid import take_from_grid
from pconv.data import transforms
from pconv.data.inputs import to_float_batch

SIZE = 32


def photo_rows(n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Shard-like rows: PNG photos of different shapes, keys, per-row random numbers."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return {"key": np.array([f"img{i}.png" for i in range(n)], dtype=object), "image": np.array(blobs, dtype=object),
            "_rand": rng.random(n)}


def hwc(chw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_training_rows_truth_grid_and_lr(scale):
    rows = photo_rows()
    out = transforms.train_transform(rows, image_size=SIZE, base_seed=7, pairs=transforms.SRPairs(scale))
    n, lr_side = 3, SIZE // scale
    assert out["image"].shape == (n, 3, SIZE, SIZE) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (n, 1, SIZE, SIZE) and out["mask"].dtype == np.uint8
    assert out["lr"].shape == (n, 3, lr_side, lr_side) and out["lr"].dtype == np.uint8
    off = scale // 2  # paper Sec. 5: LR pixel (x, y) -> (Kx + floor(K/2), Ky + floor(K/2))
    for i in range(n):
        mask = out["mask"][i, 0]
        assert int(mask.sum()) == lr_side * lr_side  # one valid pixel per LR pixel, exactly
        assert mask[off::scale, off::scale].all()
        # the HR truth is the training crop itself (same seeded crop + flip as inpainting rows)
        rng = np.random.default_rng([7, int(float(rows["_rand"][i]) * 2**53)])
        crop = transforms.random_crop_flip(images.open_image(rows["image"][i], draft_size=SIZE), SIZE, rng)
        np.testing.assert_array_equal(hwc(out["image"][i]), crop)
        # lr is that crop downsampled with the one SR filter (Pillow bicubic, antialiased)
        np.testing.assert_array_equal(hwc(out["lr"][i]), images.downsample(crop, scale))
        expected = np.asarray(Image.fromarray(crop).resize((lr_side, lr_side), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(hwc(out["lr"][i]), expected)
    assert out["skipped"].sum() == 0 and out["id"].shape == (n,)


def test_sr_rows_do_not_depend_on_batching_so_resume_is_exact():
    rows = photo_rows(4, seed=3)
    rows["pos"] = np.arange(10, 14)
    whole = transforms.train_transform(rows, image_size=SIZE, base_seed=1, pairs=transforms.SRPairs(4))
    halves = [transforms.train_transform({k: v[s] for k, v in rows.items()}, image_size=SIZE, base_seed=1,
                                         pairs=transforms.SRPairs(4))
              for s in (slice(0, 1), slice(1, 4))]
    for key in ("image", "mask", "lr", "id", "pos"):
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))


def test_sr_validation_rows_are_the_centre_crop_on_the_grid():
    rows = photo_rows(2)
    pairs = transforms.SRPairs(2)
    out = transforms.val_transform({"key": rows["key"], "image": rows["image"]}, image_size=SIZE, pairs=pairs,
                                   pairing=transforms.val_pairing(list(rows["key"]), pairs.n_val_masks))
    for i in range(2):
        crop = images.center_crop(images.open_image(rows["image"][i], draft_size=SIZE), SIZE)
        np.testing.assert_array_equal(hwc(out["image"][i]), crop)
        np.testing.assert_array_equal(hwc(out["lr"][i]), images.downsample(crop, 2))
        assert int(out["mask"][i].sum()) == (SIZE // 2) ** 2
    assert pairs.n_val_masks == 1 and pairs.describe(0) == "sr-grid-x2" and not pairs.mask_varies


def test_validation_pairs_of_both_tasks_come_through_one_interface(prepared_shards):
    """load_val_pairs with either pair source (no isinstance anywhere): SR pairs carry ``lr`` and say their mask
    is the same grid for every pair; inpainting pairs carry no extra column and each has a mask of the bank."""
    from pconv.data import stream

    sr = stream.load_val_pairs(prepared_shards["images"], transforms.SRPairs(4), SIZE, limit=3)
    bank = transforms.load_mask_bank(prepared_shards["masks"], "val")
    holes = stream.load_val_pairs(prepared_shards["images"], bank, SIZE, limit=3)
    assert sr.keys == holes.keys and len(sr) == 3
    assert set(sr.rows) == {"image", "mask", "lr"} and set(holes.rows) == {"image", "mask"}
    assert sr.rows["lr"].shape == (3, 3, SIZE // 4, SIZE // 4) and sr.rows["lr"].dtype == np.uint8
    np.testing.assert_array_equal(sr.rows["image"], holes.rows["image"])  # the same centre crops
    assert not sr.mask_varies and sr.paired_with == ["sr-grid-x4"] * 3
    assert holes.mask_varies and holes.paired_with == [bank.keys[int(j)] for j in holes.mask_index]
    grid = transforms.SRPairs(4).grid(SIZE)
    assert all(np.array_equal(m[0], grid) for m in sr.rows["mask"])
    batch = sr.batch()  # the model inputs: the LR canvas, as in training
    torch.testing.assert_close(take_from_grid(batch["input"], 4), torch.from_numpy(sr.rows["lr"]).float() / 255)
    inputs = holes.batch()
    assert inputs["input"] is inputs["image"]  # inpainting: the net takes the image (it masks it itself)


def test_the_net_input_is_the_lr_canvas_not_the_masked_image():
    out = transforms.train_transform(photo_rows(2), image_size=SIZE, base_seed=0, pairs=transforms.SRPairs(4))
    batch = to_float_batch({k: torch.from_numpy(v) for k, v in out.items()})
    x, mask, image = batch["input"], batch["mask"], batch["image"]
    lr = torch.from_numpy(out["lr"]).float() / 255.0
    torch.testing.assert_close(take_from_grid(x, 4), lr)  # the grid pixels hold the downsampled values
    assert torch.equal(x * mask, x) and (x[mask.expand_as(x) == 0] == 0).all()  # and nothing else
    assert not torch.allclose(x, image * mask)  # image * grid would hold HR samples: the wrong input
    torch.testing.assert_close(image, torch.from_numpy(out["image"]).float() / 255.0)  # the loss's truth: HR
    plain = to_float_batch({"image": torch.from_numpy(out["image"]), "mask": torch.from_numpy(out["mask"])})
    assert plain["input"] is plain["image"]  # inpainting rows: the net takes the image (it masks it itself)


def test_sr_config_keys_defaults_errors_and_registered_name(tmp_path):
    from pconv.train.driver import registered_name

    sr = TrainConfig(images="i", image_size=SIZE, task="sr").validate()
    assert (sr.task, sr.sr_scale) == ("sr", 4) and registered_name(sr) == "pconv-sr"  # no masks needed
    assert registered_name(TrainConfig(images="i", masks="m", image_size=SIZE).validate()) == "pconv-unet"
    assert registered_name(TrainConfig(images="i", task="sr", image_size=SIZE, register_as="mine").validate()) == "mine"
    with pytest.raises(ConfigError, match=r"sr_scale: super-resolution scale 3 is not supported: use one of \[2, 4\]"):
        TrainConfig(images="i", image_size=SIZE, task="sr", sr_scale=3).validate()
    with pytest.raises(ConfigError, match=r"task: must be one of inpainting, sr, got 'super'"):
        TrainConfig(images="i", masks="m", image_size=SIZE, task="super").validate()
    with pytest.raises(ConfigError, match="image_size 34 is not a multiple of sr_scale 4"):
        TrainConfig(images="i", image_size=34, layer_size=1, task="sr").validate()
    with pytest.raises(ConfigError, match="masks: not used with task sr"):
        TrainConfig(images="i", masks="m", image_size=SIZE, task="sr").validate()
    with pytest.raises(ConfigError, match="masks: a mask shard URI is required"):
        TrainConfig(images="i", image_size=SIZE).validate()  # inpainting still needs them
    path = tmp_path / "c.yaml"
    path.write_text(TrainConfig(images="i", task="sr", sr_scale=2).to_yaml())
    assert (TrainConfig.from_yaml(path).task, TrainConfig.from_yaml(path).sr_scale) == ("sr", 2)


def test_train_cli_has_the_sr_flags_and_rejects_scale_3(capsys):
    from pconv.commands import train as cli

    text = " ".join(cli.build_parser().format_help().split())
    assert "--task {inpainting,sr} inpainting (holes from the mask shards) or sr" in text
    assert "--sr-scale {2,4} upscaling factor K of task: sr, one of 2, 4" in text
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any config is built
        cli.main(["--images", "i", "--task", "sr", "--sr-scale", "3", "--image-size", "32"])
    assert exit_info.value.code == 2
    assert "argument --sr-scale: invalid choice: 3 (choose from 2, 4)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end: pconv.train.driver.run on a real local Ray cluster, MLflow in a local sqlite store
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_tiny_sr_training_registers_pconv_sr_with_task_and_scale(prepared_shards, tmp_path, monkeypatch, ray_local):
    from mlflow import MlflowClient

    from pconv.tracking import checkpoints
    from pconv.train.driver import run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    cfg = TrainConfig(images=prepared_shards["images"], task="sr", sr_scale=4, image_size=SIZE, batch_size=2,
                      phase1_steps=2, phase2_steps=2, checkpoint_every=4, val_every=4, sample_every=4, log_every=1,
                      val_size=2, vgg_weights="random", storage=str(tmp_path / "runs"), run_name="sr", workers=1)
    summary = run(cfg)  # a real Ray Train worker; no --masks anywhere
    assert summary.status == "finished" and summary.step == 4
    assert (summary.model_name, summary.model_version) == ("pconv-sr", "1")  # register_as auto -> pconv-sr

    directory = max((tmp_path / "runs" / "sr").glob("checkpoint_*"))
    saved = TrainConfig.from_dict(checkpoints.load_config_dict(directory))
    assert (saved.task, saved.sr_scale, saved.masks, saved.register_as) == ("sr", 4, "", "pconv-sr")
    assert checkpoints.load_meta(directory)["step"] == 4

    client = MlflowClient(tracking)
    version = client.get_model_version_by_alias("pconv-sr", "candidate")
    assert str(version.version) == "1"
    assert version.tags["pconv.task"] == "sr" and version.tags["pconv.sr_scale"] == "4"
    run_data = client.get_run(summary.mlflow_run_id).data
    assert run_data.params["task"] == "sr" and run_data.params["sr_scale"] == "4"
    phases = [m.value for m in client.get_metric_history(summary.mlflow_run_id, "phase")]
    assert 1 in phases and 2 in phases  # both phases ran
    assert np.isfinite(run_data.metrics["val/psnr"]) and np.isfinite(run_data.metrics["loss/total"])
    card = client.download_artifacts(summary.mlflow_run_id, "model_card.md", str(tmp_path))
    assert "task: sr (x4 super-resolution, paper Sec. 5)" in open(card).read()

    # use: super_resolve.py on the registered version gives a 4x larger image with the LR pixels exact
    import pconv.commands.evaluate as evaluate_cli
    import pconv.commands.super_resolve as sr_cli

    lr = np.random.default_rng(9).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(lr).save(tmp_path / "lr.png")
    assert sr_cli.main(["--model", "models:/pconv-sr@candidate", "--image", str(tmp_path / "lr.png"),
                        "--out", str(tmp_path / "hr.png")]) == 0
    hr = np.asarray(Image.open(tmp_path / "hr.png"))
    assert hr.shape == (48, 80, 3)
    np.testing.assert_array_equal(hr[2::4, 2::4], lr)
    # evaluation against bicubic on the held-back split, logged to MLflow, with the inpainting promotion rule
    assert evaluate_cli.main(["--model", "models:/pconv-sr@candidate", "--images", prepared_shards["images"],
                              "--image-size", str(SIZE), "--limit", "2", "--promote", "champion"]) == 0
    assert str(client.get_model_version_by_alias("pconv-sr", "champion").version) == "1"  # no holder: promoted
    evals = client.search_runs([client.get_experiment_by_name("pconv-evaluation").experiment_id])
    assert evals and evals[0].data.tags["pconv.task"] == "sr" and "eval/psnr_y" in evals[0].data.metrics
    # the run says which SR protocol it scored with, and has both outputs of both methods (docs/variants.md)
    assert evals[0].data.params["protocol"] == "lr-pasted"
    assert {"eval/raw_psnr_y", "baseline/psnr_y", "baseline/raw_psnr_y"} <= set(evals[0].data.metrics)


def test_the_sr_loss_composite_keeps_the_lr_canvas_as_inference_does():
    """Issue 25 item 2: I_comp (perceptual, style_comp, tv) keeps the pixels inference keeps. Inpainting: the ground
    truth (the paper's eq., the default). SR: the LR canvas the net took (``known=``), not the HR pixels at the grid."""
    from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor
    from pconv.core.sr_grid import paste_on_grid, place_on_grid

    loss = InpaintingLoss(VGG16FeatureExtractor(weights="random"))
    gen = torch.Generator().manual_seed(0)
    gt, output = torch.rand(2, 3, SIZE, SIZE, generator=gen), torch.rand(2, 3, SIZE, SIZE, generator=gen)
    lr = torch.nn.functional.avg_pool2d(gt, 4)  # not the HR pixels at the grid
    canvas, grid = place_on_grid(lr, 4)
    terms = loss(grid, output, gt, known=canvas)
    # the composite is the output with the LR pixels pasted: scored as an output, its style term is style_comp
    as_output = loss(grid, paste_on_grid(output, lr, 4), gt)
    torch.testing.assert_close(terms["style_comp"], as_output["style_out"])
    torch.testing.assert_close(terms["valid"], loss(grid, output, gt)["valid"])  # L_valid: the raw output vs HR
    assert not torch.allclose(terms["style_comp"], loss(grid, output, gt)["style_comp"])  # HR at the grid differs
    # inpainting: unchanged, the known pixels are the ground truth's
    holes = (torch.rand(2, 1, SIZE, SIZE, generator=gen) > 0.3).float()
    for name, value in loss(holes, output, gt).items():
        torch.testing.assert_close(value, loss(holes, output, gt, known=gt)[name])
    with pytest.raises(ValueError, match="known .* differ in shape"):
        loss(grid, output, gt, known=lr)
