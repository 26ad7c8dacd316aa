"""The gated-convolution variant of the U-Net (``conv: gated``, issue 18): the same U-Net with GatedConv2d in every
slot. Asserted: shapes and the recorded variant, gradients to every trainable parameter, the exact parameter count
against the partial net, independence from hole content, the config key (default, typo error listing the choices,
YAML round trip), loading rebuilding the variant from a checkpoint's config (and refusing a mismatch), and — end to
end on Ray — a tiny gated training that registers a version tagged with its variant, which inpaint.py and the
evaluation then load from the registry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pconv.tracking import checkpoints
from pconv.core.config import ConfigError, TrainConfig
from pconv.core.layers import CONV_TYPES, GatedConv2d, PartialConv2d
from pconv.tracking.loading import from_state_dict, load_model
from pconv.core.unet import PAPER_ENCODER, build_model, conv_of_state_dict, decoder_spec

LAYER_SIZE, SIZE = 4, 32


def pair(n: int = 2, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=gen)
    mask = (torch.rand(n, 1, size, size, generator=gen) > 0.3).float()
    mask[:, :, 8:20, 6:22] = 0.0
    return image, mask


@pytest.mark.parametrize("conv", CONV_TYPES)
def test_variant_shapes_layers_and_record(conv):
    model = build_model(LAYER_SIZE, conv=conv)
    layer = {"partial": PartialConv2d, "gated": GatedConv2d}[conv]
    convs = [b.conv for b in [*model.encoder, *model.decoder]]
    assert len(convs) == 2 * LAYER_SIZE and all(type(c) is layer for c in convs)
    assert model.conv_type == conv and conv_of_state_dict(model.state_dict()) == conv
    image, mask = pair()
    out, out_mask = model(image, mask)
    assert out.shape == (2, 3, SIZE, SIZE) and out_mask.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(out).all()
    if conv == "gated":  # no mask update rule: every output pixel holds a value
        assert torch.equal(out_mask, torch.ones_like(out_mask))


def test_gated_parameter_count_vs_partial_at_the_papers_depth():
    """Each conv slot (C_in, C_out, k, bias) costs C_in·C_out·k² (+C_out) as a partial conv and
    2·C_out·(C_in+1)·k² (+2·C_out) gated (Conv_f and Conv_g, each with the extra mask channel); BN is the same."""
    encoder = [(3 if i == 0 else PAPER_ENCODER[i - 1][1], c, k, not bn) for i, (k, c, bn) in enumerate(PAPER_ENCODER)]
    decoder = [(below + skip, out, 3, not bn) for below, skip, out, bn in decoder_spec(8)]
    slots = encoder + decoder
    partial = sum(ci * co * k * k + (co if b else 0) for ci, co, k, b in slots)
    gated = sum(2 * co * (ci + 1) * k * k + (2 * co if b else 0) for ci, co, k, b in slots)
    bn = 2 * (sum(c for _, c, _, b in slots if not b))

    def count(conv):
        return sum(p.numel() for p in build_model(8, conv=conv).parameters())

    assert count("partial") == partial + bn == 32_859_796
    assert count("gated") == gated + bn
    assert 2.0 < count("gated") / count("partial") < 2.01  # twice the convs plus one mask channel each


def test_gated_gradients_reach_every_parameter_and_freeze_works():
    torch.manual_seed(0)
    model = build_model(LAYER_SIZE, conv="gated").train()
    image, mask = pair(seed=1)
    out, _ = model(image, mask)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.freeze_encoder_bn()  # phase 2 works unchanged on the variant
    assert all(not bn.training and not bn.weight.requires_grad for bn in model.encoder_batch_norms())


def test_gated_output_does_not_depend_on_hole_content():
    torch.manual_seed(0)
    model = build_model(LAYER_SIZE, conv="gated").eval()
    image, mask = pair(seed=2)
    other = image * mask + torch.rand_like(image) * (1 - mask)
    with torch.no_grad():
        assert torch.allclose(model(image, mask)[0], model(other, mask)[0], atol=1e-6)


def test_conv_config_key_default_typo_and_round_trip(tmp_path):
    base = dict(images="i", masks="m", image_size=32)
    assert TrainConfig(**base).validate().conv == "partial"
    with pytest.raises(ConfigError, match=r"conv: must be one of partial, gated, got 'gatd'"):
        TrainConfig(**base, conv="gatd").validate()
    with pytest.raises(ValueError, match="valid choices: partial, gated"):
        build_model(LAYER_SIZE, conv="gatd")
    path = tmp_path / "c.yaml"
    path.write_text(TrainConfig(**base, conv="gated").to_yaml())
    assert TrainConfig.from_yaml(path).conv == "gated"


def test_train_cli_rejects_a_conv_typo_before_any_cluster_work(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "pipelines" / "train.py"), "--images", str(tmp_path),
                           "--masks", str(tmp_path), "--conv", "gatd"], capture_output=True, text=True, timeout=120,
                          cwd=repo)
    assert proc.returncode == 2  # argparse's choices: refused before any config is built
    assert "argument --conv: invalid choice: 'gatd' (choose from 'partial', 'gated')" in proc.stderr


def save_checkpoint(directory: Path, model: torch.nn.Module, conv: str) -> Path:
    cfg = TrainConfig(images="x", masks="y", image_size=SIZE, layer_size=LAYER_SIZE, conv=conv, run_name="v",
                      phase1_steps=1, phase2_steps=0)
    state = {"model": model.state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "phase": 1, "epoch": 0,
             "data_seed": 0}
    return checkpoints.save(directory, state, cfg.to_yaml(), {"mlflow_run_id": None, "step": 1})


def test_loading_rebuilds_the_variant_from_the_config_and_refuses_a_mismatch(tmp_path):
    torch.manual_seed(3)
    gated = build_model(LAYER_SIZE, conv="gated").eval()
    save_checkpoint(tmp_path / "g", gated, "gated")
    model, info = load_model(str(tmp_path / "g"))
    assert info.conv == "gated" and model.conv_type == "gated"
    image, mask = pair(seed=4)
    with torch.no_grad():
        assert torch.equal(model(image, mask)[0], gated(image, mask)[0])
    # from_state_dict without a config (batch actors): the weights say which variant they are
    assert from_state_dict(gated.state_dict(), LAYER_SIZE).conv_type == "gated"
    save_checkpoint(tmp_path / "bad", gated, "partial")  # config and weights disagree
    with pytest.raises(ValueError, match="config says conv='partial' but the weights are a 'gated' U-Net"):
        load_model(str(tmp_path / "bad"))
    # a config written before the key existed is the paper's net
    partial = build_model(LAYER_SIZE).eval()
    directory = save_checkpoint(tmp_path / "old", partial, "partial")
    text = (directory / checkpoints.CONFIG_FILE).read_text()
    (directory / checkpoints.CONFIG_FILE).write_text("\n".join(l for l in text.splitlines() if not l.startswith("conv:")))
    assert load_model(str(directory))[1].conv == "partial"


# ---------------------------------------------------------------------------------------------
# End to end: train (Ray Train, one worker) -> registry -> inpaint.py and evaluation
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_gated_variant_trains_registers_and_serves_inpaint_and_evaluation(prepared_shards, tmp_path, monkeypatch,
                                                                          ray_local):
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    from pconv.evaluation import inpainting
    from pconv.train.driver import run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    cfg = TrainConfig(images=prepared_shards["images"], masks=prepared_shards["masks"], image_size=SIZE, batch_size=2,
                      phase1_steps=2, phase2_steps=1, checkpoint_every=3, val_every=3, sample_every=3, log_every=1,
                      val_size=2, vgg_weights="random", storage=str(tmp_path / "runs"), run_name="gated",
                      register_as="pconv-gated", workers=1, conv="gated")
    summary = run(cfg)  # a real Ray Train worker: local mode does not persist checkpoints to `storage`
    assert summary.status == "finished" and summary.step == 3 and summary.model_version == "1"

    client = MlflowClient(tracking)
    version = client.get_model_version("pconv-gated", "1")
    assert version.tags["pconv.conv"] == "gated"
    assert version.tags["pconv.serialization"] == "pt2"  # the gated net exports with torch.export too
    card = Path(client.download_artifacts(summary.mlflow_run_id, "model_card.md", str(tmp_path))).read_text()
    assert "convolution: gated" in card
    directory = max((tmp_path / "runs" / "gated").glob("checkpoint_*"))
    assert TrainConfig.from_dict(checkpoints.load_config_dict(directory)).conv == "gated"  # config.yaml records it

    model, info = load_model("models:/pconv-gated@candidate")
    assert info.conv == "gated" and model.conv_type == "gated"

    # inpaint.py on the registered gated model: any size, valid pixels unchanged
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    holes = np.zeros((40, 50), dtype=bool)
    holes[10:25, 12:30] = True
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(np.where(holes, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "pipelines" / "inpaint.py"), "--model",
                           "models:/pconv-gated@candidate", "--image", str(tmp_path / "photo.png"), "--mask",
                           str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png"), "--hole-color", "white",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == photo.shape
    np.testing.assert_array_equal(out[~holes], photo[~holes])

    # the paper's per-bin evaluation loads it from the registry as well
    result = inpainting.run_evaluation("models:/pconv-gated/1", prepared_shards["images"], prepared_shards["masks"], SIZE,
                              limit=2, device="cpu", baseline=False, experiment=None)
    assert result["pairs"] > 0 and np.isfinite(result["model"]["overall"]["psnr"])


def test_compare_script_pools_bins_and_writes_table_and_chart(tmp_path):
    """benchmarks/compare_conv.py's reporting (the training/evaluation calls are the pipeline's own, tested above)."""
    import argparse

    from conftest import load_benchmark

    cmp = load_benchmark("compare_conv")
    rows = [{"bin": 0, "border": False, "count": 3, "psnr": 30.0}, {"bin": 0, "border": True, "count": 1, "psnr": 26.0},
            {"bin": 5, "border": False, "count": 2, "psnr": 20.0}]
    assert cmp.bin_psnr(rows) == {0: 29.0, 5: 20.0}
    results = {conv: {"params": 10 * (i + 1), "train_wall_s": 4.0, "steps": 2, "pairs": 6,
                      "loss_curve": [(1, 2.0), (2, 1.5 - i)], "overall": {"l1": 5.0, "psnr": 25.0 + i, "ssim": 0.5},
                      "bin_psnr": cmp.bin_psnr(rows)} for i, conv in enumerate(cmp.CONVS)}
    args = argparse.Namespace(seed=0, steps=2, phase2_fraction=0.5, batch=2, image_size=32, vgg_weights="random")
    table = cmp.markdown(results, args)
    assert "| partial | 10 | 2.00 | 1.5000 | 5.00 | 25.00 | 0.5000 | 29.00 |" in table
    assert "| gated | 20 | 2.00 | 0.5000 | 5.00 | 26.00 | 0.5000 | 29.00 |" in table and "6 pairs" in table
    cmp.chart(results, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
