"""The training loop and driver end to end on the session's local Ray: one real worker (two in the slow test).

What is asserted: both phases run with the paper's learning rates, metrics reach MLflow with steps, non-finite
losses are skipped/counted and stop the run without a checkpoint of the failing step, phase 2 freezes encoder BN
completely (statistics and affine parameters identical across phase-2 checkpoints while decoder BN changes),
fine-tuning starts from the given weights, and a run re-run by name continues from its latest checkpoint at the
configured learning rate (or does nothing when finished).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pconv.tracking import checkpoints
from pconv.core.config import ConfigError, TrainConfig
from pconv.core.unet import build_model

pytestmark = pytest.mark.integration


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_config(shards: dict[str, str], storage: Path, **kw) -> TrainConfig:
    base = dict(images=shards["images"], masks=shards["masks"], image_size=32, batch_size=2, phase1_steps=2,
                phase2_steps=2, checkpoint_every=2, val_every=2, sample_every=2, log_every=1, val_size=3,
                vgg_weights="random", storage=str(storage), run_name="t", register_as="", workers=1)
    base.update(kw)
    return TrainConfig(**base)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def checkpoints_by_step(storage: Path, run_name: str) -> dict[int, Path]:
    out = {}
    for meta in (storage / run_name).glob("checkpoint_*/meta.json"):
        out[json.loads(meta.read_text())["step"]] = meta.parent
    return dict(sorted(out.items()))


def bn_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder BN tensors, decoder BN tensors) of a checkpoint: running stats and affine parameters."""
    state = checkpoints.load_state(directory)["model"]
    model = build_model(checkpoints.load_config_dict(directory)["layer_size"])
    enc_bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
              and any(m is e for e in model.encoder_batch_norms())}
    dec_bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)} - enc_bn
    assert enc_bn and dec_bn

    def pick(names):
        return {k: v for k, v in state.items() if k.rsplit(".", 1)[0] in names and not k.endswith("num_batches_tracked")}

    return pick(enc_bn), pick(dec_bn)


def test_register_as_auto_is_the_inpainting_model_name():
    from pconv.tracking import registry
    from pconv.train.driver import registered_name

    assert registered_name(TrainConfig()) == registry.INPAINTING_MODEL  # default register_as: "auto"
    assert registered_name(TrainConfig(register_as="").resolved()) is None
    assert registered_name(TrainConfig(register_as="my-model")) == "my-model"


@pytest.mark.parametrize("amp", [(True, torch.float16, True), (True, torch.bfloat16, False), (False, None, False)],
                         ids=["fp16+scaler", "bf16", "fp32"])
def test_grad_compression_help_names_the_hook_the_loop_uses(amp):
    """`--grad-compression fp16` sends fp16 only with a GradScaler and bf16 otherwise (issue 25 item 4): the help
    text (--help and README's configuration table) names the hook the loop picks for each precision."""
    from dataclasses import fields

    from pconv.train.loop import compress_hook
    from pconv.train.state import AmpSettings, WorkerContext

    ctx = WorkerContext(TrainConfig(grad_compression="fp16"), 0, 2, torch.device("cpu"), AmpSettings(*amp), None)
    text = next(f for f in fields(TrainConfig) if f.name == "grad_compression").metadata["help"]
    assert f"`{compress_hook(ctx).__name__}`" in text, text


def test_one_worker_runs_both_phases_and_logs_to_mlflow(prepared_shards, tmp_path, sqlite_tracking, ray_local):
    from pconv.train.driver import run

    summary = run(tiny_config(prepared_shards, tmp_path / "runs", phase2_steps=3))
    assert summary.status == "finished" and summary.step == 5 and summary.mlflow_run_id
    assert list(checkpoints_by_step(tmp_path / "runs", "t")) == [2, 4, 5]
    assert summary.checkpoint == str(checkpoints_by_step(tmp_path / "runs", "t")[5])
    lr = metric_history(sqlite_tracking, summary.mlflow_run_id, "lr")
    phase = metric_history(sqlite_tracking, summary.mlflow_run_id, "phase")
    assert [v for _, v in lr] == pytest.approx([2e-4, 2e-4, 5e-5, 5e-5, 5e-5])
    assert [v for _, v in phase] == [1, 1, 2, 2, 2]
    for key in ("loss/valid", "loss/hole", "loss/perceptual", "loss/style_out", "loss/style_comp", "loss/tv",
                "loss/total", "throughput/images_per_s", "data/wait_fraction", "data/skipped", "train/nan_steps"):
        assert [s for s, _ in metric_history(sqlite_tracking, summary.mlflow_run_id, key)] == [1, 2, 3, 4, 5], key
    assert all(v > 0 for _, v in metric_history(sqlite_tracking, summary.mlflow_run_id, "loss/total"))
    psnr = metric_history(sqlite_tracking, summary.mlflow_run_id, "val/psnr")
    assert [s for s, _ in psnr] == [2, 4, 5] and all(v > 0 for _, v in psnr)
    from mlflow.tracking import MlflowClient

    from pconv.tracking.runs import SAMPLES_KEY

    images = [a.path for a in MlflowClient(sqlite_tracking).list_artifacts(summary.mlflow_run_id, "images")]
    steps = {int(p.split("+step+", 1)[1].split("+", 1)[0]) for p in images
             if p.startswith(f"images/{SAMPLES_KEY}+step+") and p.endswith(".png")}
    assert 2 in steps and 5 in steps  # one sample grid per sampled step, on MLflow's image step slider


def _init_checkpoint(directory: Path, shards: dict[str, str], change) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of a layer-4 model whose parameters ``change(name, tensor)`` edits in place (--init-from)."""
    source = build_model(4)
    with torch.no_grad():
        for name, p in source.named_parameters():
            change(name, p)
    path = checkpoints.save(directory, {"model": source.state_dict(), "optimizer": {}, "scaler": {}, "step": 7,
                                        "phase": 1, "epoch": 0, "data_seed": 0},
                            tiny_config(shards, directory, layer_size=4).to_yaml(), {"mlflow_run_id": None})
    return path, {k: v.clone() for k, v in source.state_dict().items()}


def test_nan_losses_are_skipped_counted_and_stop_the_run(prepared_shards, tmp_path, sqlite_tracking, ray_local):
    """Weights with a NaN (a diverged model given as --init-from) make every loss non-finite: each step is skipped
    (weights untouched) and counted, and the third in a row stops the run before that step's checkpoint."""
    from pconv.train.driver import run

    def poison(name, p):
        if name == next(n for n, _ in build_model(4).named_parameters()):
            p.view(-1)[0] = float("nan")

    init, source = _init_checkpoint(tmp_path / "init", prepared_shards, poison)
    with pytest.raises(Exception, match="3 consecutive non-finite losses at step 2"):
        run(tiny_config(prepared_shards, tmp_path / "runs", max_nan_steps=3, phase1_steps=4, checkpoint_every=1,
                        log_every=1, init_from=str(init), max_failures=0))
    found = checkpoints_by_step(tmp_path / "runs", "t")
    assert list(found) == [1, 2]  # the skipped steps were checkpointed; the step that stopped the run was not
    state = checkpoints.load_state(found[2])
    assert state["counters"]["train/nan_steps"] == 2
    trained = dict(build_model(4).named_parameters())
    for name in trained:  # skipped steps leave the weights as they were
        torch.testing.assert_close(state["model"][name], source[name], rtol=0, atol=0, equal_nan=True)
    run_id = checkpoints.load_meta(found[2])["mlflow_run_id"]
    assert [v for _, v in metric_history(sqlite_tracking, run_id, "train/nan_steps")] == [1, 2]


def test_fail_fast_on_missing_or_empty_data(prepared_shards, tmp_path, ray_local):
    from pconv.train.driver import run

    with pytest.raises(ConfigError, match="no manifest.json"):
        run(tiny_config({**prepared_shards, "images": str(tmp_path / "nothing")}, tmp_path / "runs"))
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        run(tiny_config(prepared_shards, tmp_path / "runs", batch_size=64))
    with pytest.raises(ConfigError, match="free CPU"):
        run(tiny_config(prepared_shards, tmp_path / "runs", workers=2, cpus_per_worker=1.0))


@pytest.mark.slow
def test_two_workers_freeze_encoder_bn_and_resume_by_name(prepared_shards, tmp_path, sqlite_tracking, ray_local):
    from pconv.train.driver import run

    storage = tmp_path / "runs"
    cfg = tiny_config(prepared_shards, storage, workers=2, batch_size=4, phase1_steps=2, phase2_steps=4,
                      register_as="pconv-unet")
    first = run(cfg)
    assert first.status == "finished" and first.step == 6 and first.model_version == "1"
    found = checkpoints_by_step(storage, "t")
    assert list(found) == [2, 4, 6]
    for step, directory in found.items():
        meta = checkpoints.load_meta(directory)
        assert meta["mlflow_run_id"] == first.mlflow_run_id and meta["phase"] == (1 if step <= 2 else 2)
        assert checkpoints.load_state(directory)["phase"] == meta["phase"]
    # Phase 2 froze encoder BN completely: statistics AND affine parameters equal across phase-2 checkpoints
    # (and equal to the end of phase 1); decoder BN kept training.
    enc2, dec2 = bn_state(found[2])
    enc4, dec4 = bn_state(found[4])
    enc6, dec6 = bn_state(found[6])
    for k in enc2:
        assert torch.equal(enc2[k], enc4[k]) and torch.equal(enc4[k], enc6[k]), k
    assert any(not torch.equal(dec4[k], dec6[k]) for k in dec4 if "running_mean" in k)
    assert any(not torch.equal(dec4[k], dec6[k]) for k in dec4 if k.endswith("weight"))

    # Re-running the finished run is a no-op that says so.
    again = run(cfg)
    assert again.status == "already-finished" and again.step == 6 and again.mlflow_run_id == first.mlflow_run_id
    assert list(checkpoints_by_step(storage, "t")) == [2, 4, 6]

    # The same run name with more phase-2 steps continues from step 6 (not from 0), in the same MLflow run, at the
    # phase-2 learning rate it is given now (not the checkpoint's).
    longer = run(tiny_config(prepared_shards, storage, workers=2, batch_size=4, phase1_steps=2, phase2_steps=6,
                             register_as="", finetune_lr=1e-4))
    assert longer.status == "finished" and longer.step == 8 and longer.mlflow_run_id == first.mlflow_run_id
    assert 8 in checkpoints_by_step(storage, "t")
    steps = [s for s, _ in metric_history(sqlite_tracking, first.mlflow_run_id, "loss/total")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # no step logged twice: training resumed at 7
    lr = dict(metric_history(sqlite_tracking, first.mlflow_run_id, "lr"))
    assert lr[6] == pytest.approx(5e-5) and lr[7] == lr[8] == pytest.approx(1e-4)


def test_finetune_only_from_a_checkpoint_runs_phase_two(prepared_shards, tmp_path, sqlite_tracking, ray_local):
    """--phase1-steps 0 --init-from CHECKPOINT: starts from those weights, encoder BN frozen (so its parameters and
    statistics are still the given ones at the end), lr 5e-5 throughout, the decoder trained."""
    from pconv.train.driver import run

    def shift(name, p):
        p.add_(0.01)

    init, source = _init_checkpoint(tmp_path / "init", prepared_shards, shift)
    summary = run(tiny_config(prepared_shards, tmp_path / "runs", phase1_steps=0, phase2_steps=2, layer_size=4,
                              init_from=str(init), run_name="ft"))
    assert summary.status == "finished" and summary.step == 2
    assert [v for _, v in metric_history(sqlite_tracking, summary.mlflow_run_id, "lr")] == pytest.approx([5e-5, 5e-5])
    assert [v for _, v in metric_history(sqlite_tracking, summary.mlflow_run_id, "phase")] == [2, 2]
    final = checkpoints_by_step(tmp_path / "runs", "ft")[2]
    enc, dec = bn_state(final)
    for k, v in enc.items():  # the given weights (a fresh BN has weight 1, bias 0), frozen
        assert torch.equal(v, source[k]), k
    assert any(not torch.equal(v, source[k]) for k, v in dec.items() if k.endswith("weight"))


def test_unreachable_tracking_server_does_not_stop_training(prepared_shards, tmp_path, ray_local, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("PCONV_MLFLOW_RETRY", "2,0.05,1,5")
    from pconv.train.driver import run

    summary = run(tiny_config(prepared_shards, tmp_path / "runs", register_as="pconv-unet"))
    assert summary.status == "finished" and summary.step == 4
    assert summary.mlflow_run_id is None and summary.model_version is None
