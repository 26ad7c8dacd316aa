"""Training options for clusters: learning-rate scaling with the global batch, DDP gradient compression (fp16 only
with a GradScaler, else bf16) and bucket size (installed on the real DDP model of a 2-worker gloo group, which still
learns), and ``--compile`` (same loss as eager)."""

from __future__ import annotations

import math

import pytest

from pconv.core.config import PAPER_LR_PHASE1, PAPER_LR_PHASE2, ConfigError, TrainConfig


def cfg_for(**kw) -> TrainConfig:
    return TrainConfig(images="i", masks="m", **kw)


def parsed(workers: str, **kw) -> TrainConfig:
    """A config read as YAML or flags are (`workers` as text: N or MIN-MAX)."""
    return TrainConfig.from_dict({"images": "i", "masks": "m", "workers": workers, **kw})


@pytest.mark.parametrize("scaling, workers, factor", [
    ("none", 8, 1.0),              # the paper's values as given, whatever the batch
    ("linear", 8, 8.0),            # 48 / 6
    ("sqrt", 8, math.sqrt(8.0)),
    ("linear", 1, 1.0),            # the paper's batch: no change
    ("sqrt", 4, 2.0),
])
def test_effective_lr_scales_both_phases_from_the_papers_batch_of_six(scaling, workers, factor):
    cfg = cfg_for(workers=workers, lr_scaling=scaling).validate()
    assert cfg.batch_size == 6 * workers
    assert cfg.effective_lr(1) == pytest.approx(PAPER_LR_PHASE1 * factor)
    assert cfg.effective_lr(2) == pytest.approx(PAPER_LR_PHASE2 * factor)


def test_workers_min_max_is_elastic_and_each_worker_keeps_its_share_of_the_batch():
    """`--workers MIN-MAX` (flag or YAML) sets min_workers; a single number stays fixed, also over a file's range.
    The global batch rule: `batch_size` is the batch at MAX workers; with fewer up each keeps its share, and
    lr_scaling follows the batch actually trained (none: the paper's lr whatever the group)."""
    from pconv.commands.train import build_parser
    from pconv.core.config import merge

    flags = {k: v for k, v in vars(build_parser().parse_args(["--workers", "2-8", "--lr-scaling", "linear"])).items()
             if k not in ("log_level", "config")}
    cfg = merge(cfg_for(), flags).validate()
    assert (cfg.min_workers, cfg.workers, cfg.elastic, cfg.batch_size, cfg.per_worker_batch) == (2, 8, True, 48, 6)
    assert [cfg.global_batch(w) for w in (2, 5, 8)] == [12, 30, 48] and cfg.global_batch() == 48
    assert cfg.effective_lr(1, 2) == pytest.approx(2 * PAPER_LR_PHASE1)
    assert cfg.effective_lr(2, 8) == pytest.approx(8 * PAPER_LR_PHASE2) == cfg.effective_lr(2)
    assert parsed("2-8").validate().effective_lr(1, 2) == PAPER_LR_PHASE1  # lr_scaling none
    fixed = merge(cfg, {"workers": "4"}).validate()
    assert (fixed.min_workers, fixed.workers, fixed.elastic) == (None, 4, False)
    assert not parsed("3-3").validate().elastic  # MIN = MAX: a fixed group
    assert TrainConfig.from_dict({"workers": "1-2", "images": "i", "masks": "m"}).min_workers == 1
    with pytest.raises(ConfigError, match="workers 5-4: MIN must be in 1..MAX"):
        parsed("5-4").validate()
    with pytest.raises(ConfigError, match="key 'workers' expects int"):
        TrainConfig.from_dict({"workers": "two"})
    with pytest.raises(ConfigError, match="elastic_resize_s: must be >= 0"):
        parsed("1-2", elastic_resize_s=-1).validate()


def test_explicit_global_batch_drives_the_scaling_and_the_optimizer_uses_it():
    from pconv.core.unet import build_model
    from pconv.train.loop import make_optimizer

    cfg = cfg_for(workers=2, batch_size=24, lr_scaling="linear", image_size=64).validate()
    model = build_model(cfg.layer_size)
    assert make_optimizer(model, 1, cfg).param_groups[0]["lr"] == pytest.approx(4 * PAPER_LR_PHASE1)
    assert make_optimizer(model, 2, cfg).param_groups[0]["lr"] == pytest.approx(4 * PAPER_LR_PHASE2)
    assert make_optimizer(model, 1, cfg, world=1).param_groups[0]["lr"] == pytest.approx(2 * PAPER_LR_PHASE1)


@pytest.mark.parametrize("key, value, message", [
    ("lr_scaling", "cubic", "lr_scaling: must be one of none, linear, sqrt"),
    ("grad_compression", "int8", "grad_compression: must be one of none, fp16"),
    ("ddp_bucket_mb", 0.0, "ddp_bucket_mb: must be > 0"),
])
def test_bad_cluster_options_are_refused_before_ray(key, value, message):
    with pytest.raises(ConfigError, match=message):
        cfg_for(**{key: value}).validate()


def test_cli_flags_exist_for_the_new_keys():
    from pconv.commands import train

    args = vars(train.build_parser().parse_args(["--lr-scaling", "sqrt", "--grad-compression", "fp16",
                                                  "--ddp-bucket-mb", "50", "--compile"]))
    picked = {k: args[k] for k in ("lr_scaling", "grad_compression", "ddp_bucket_mb", "compile")}
    assert picked == {"lr_scaling": "sqrt", "grad_compression": "fp16", "ddp_bucket_mb": 50.0, "compile": True}


@pytest.mark.parametrize("amp, hook", [
    ((True, "float16", True), "fp16_compress_hook"),   # fp16 + GradScaler (CUDA): the loss scale keeps gradients in range
    ((True, "bfloat16", False), "bf16_compress_hook"),  # bf16: unscaled gradients, 4 % below fp16's smallest normal
    ((False, None, False), "bf16_compress_hook"),      # fp32 (amp off, CPU): unscaled too
    ((True, "float16", False), "bf16_compress_hook"),  # fp16 without a scaler (CPU autocast)
])
def test_fp16_gradient_compression_needs_a_grad_scaler_else_bf16(amp, hook):
    import torch

    from pconv.train.loop import compress_hook
    from pconv.train.state import AmpSettings, WorkerContext

    settings = AmpSettings(amp[0], getattr(torch, amp[1]) if amp[1] else None, amp[2])
    ctx = WorkerContext(cfg_for(grad_compression="fp16").validate(), 0, 2, torch.device("cpu"), settings, None)
    assert compress_hook(ctx).__name__ == hook
    assert compress_hook(WorkerContext(cfg_for().validate(), 0, 2, torch.device("cpu"), settings, None)) is None


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["fp16", "none"])
def test_ddp_comm_hook_and_bucket_size_on_two_gloo_workers(compression, tmp_path, ray_local):
    """2 CPU workers (gloo): the DDP model made by prepare_for_training carries the compression hook (no GradScaler
    on CPU: bf16_compress_hook) or none, and the bucket size asked for; a few steps on a fixed batch lower the loss
    (compressed gradients still train), and gradients far below fp16's range (a loss scaled by 1e-7, as unscaled
    bf16/fp32 gradients can be) arrive non-zero, as without compression (fp16_compress_hook flushed them to 0)."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import json as _json
        from pathlib import Path as _Path

        import ray.train
        import torch as _torch

        from pconv.core.config import TrainConfig as _Cfg
        from pconv.core.unet import build_model
        from pconv.train.loop import make_optimizer, prepare_for_training
        from pconv.train.state import WorkerContext

        cfg = _Cfg.from_dict(config["cfg"]).validate()
        _torch.manual_seed(0)
        model = prepare_for_training(build_model(cfg.layer_size), WorkerContext.current(cfg, None))
        opt = make_optimizer(model, 1, cfg)
        gen = _torch.Generator().manual_seed(ray.train.get_context().get_world_rank())
        image = _torch.rand(2, 3, 32, 32, generator=gen)
        mask = (_torch.rand(2, 1, 32, 32, generator=gen) > 0.3).float()
        losses = []
        for _ in range(8):
            out, _ = model(image, mask)
            loss = (out - image).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        opt.zero_grad()
        out, _ = model(image, mask)
        ((out - image).abs().mean() * 1e-7).backward()  # gradients ~1e-10: below fp16's smallest subnormal
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        nonzero = sum(int((g != 0).sum()) for g in grads) / sum(g.numel() for g in grads)
        report = {"hooks": [getattr(h, "__name__", str(h)) for h, _ in getattr(model, "_comm_hooks", [])],
                  "bucket_bytes": getattr(model, "bucket_bytes_cap", None), "type": type(model).__name__,
                  "losses": losses, "tiny_nonzero": nonzero}
        rank = ray.train.get_context().get_world_rank()
        _Path(config["out"], f"rank{rank}.json").write_text(_json.dumps(report))

    cfg = cfg_for(image_size=32, workers=2, batch_size=4, grad_compression=compression, ddp_bucket_mb=1.0,
                  lr=1e-3, vgg_weights="random", layer_size=4).validate()
    TorchTrainer(loop, train_loop_config={"cfg": cfg.to_dict(), "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="ddp-hook", storage_path=str(tmp_path / "ray"))).fit()
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rep["type"] == "DistributedDataParallel"
        assert rep["hooks"] == (["bf16_compress_hook"] if compression == "fp16" else [])
        assert rep["bucket_bytes"] == 1024 * 1024
        assert rep["losses"][-1] < 0.8 * rep["losses"][0], rep["losses"]
        assert rep["tiny_nonzero"] > 0.9, rep["tiny_nonzero"]


@pytest.mark.slow  # 44-62 s with a cold Inductor cache on 2 shared CPU cores (C++ code generation), ~13 s warm
def test_compiled_training_steps_match_eager_through_both_phases():
    """``--compile`` makes the worker call ``model.compile()`` and ``loss_fn.compile()`` (pconv.train.loop): the
    compiled net and loss give eager's loss terms, step after step with Adam, and again after the phase-2 switch
    (encoder BN frozen: a recompile); compiling in place keeps the state-dict keys the checkpoints use."""
    import copy

    import torch

    from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor
    from pconv.core.unet import build_model
    from pconv.train.loop import make_optimizer

    cfg = cfg_for(image_size=32, layer_size=2, compile=True).validate()  # 4 PConv blocks: less to compile
    torch.manual_seed(0)
    eager = build_model(cfg.layer_size)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    loss_c = InpaintingLoss(VGG16FeatureExtractor(weights="random"))
    loss_c.compile()
    runs = {"eager": [eager, InpaintingLoss(VGG16FeatureExtractor(weights="random"))], "compiled": [compiled, loss_c]}
    assert list(compiled.state_dict()) == list(eager.state_dict())
    gen = torch.Generator().manual_seed(1)
    graphs = [torch._dynamo.utils.counters["stats"]["unique_graphs"]]  # graphs Dynamo captured so far
    try:
        for step, phase in enumerate((1, 1, 2, 2)):
            if step == 2:
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            image = torch.rand(2, 3, 32, 32, generator=gen)
            mask = (torch.rand(2, 1, 32, 32, generator=gen) > 0.4).float()
            terms = {}
            for name, run in runs.items():
                model, loss_fn = run[:2]
                if len(run) == 2 or (phase == 2 and not model.encoder_bn_frozen):
                    if phase == 2:
                        model.freeze_encoder_bn()
                    run[2:] = [make_optimizer(model, phase, cfg)]
                model.train()
                output, _ = model(image, mask)
                terms[name] = loss_fn(mask, output, image)
                run[2].zero_grad(set_to_none=True)
                terms[name]["total"].backward()
                run[2].step()
            for key, value in terms["eager"].items():
                torch.testing.assert_close(terms["compiled"][key].detach(), value.detach(), rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"step {step} (phase {phase}) {key}: {m}")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert graphs[0] < graphs[1] < graphs[2], f"compiled graphs before / after phase 1 / after phase 2: {graphs}"
        assert compiled.encoder_bn_frozen and list(compiled.state_dict()) == list(eager.state_dict())
    finally:
        torch._dynamo.reset()
