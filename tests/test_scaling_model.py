"""benchmarks/scaling_model.py: FLOP and parameter counts against the real model and loss, and the cost model's
basic laws (no super-linear scaling, efficiency falling with the node count, bandwidth and batch helping)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def sm():
    yield load_benchmark("scaling_model")
    sys.modules.pop("scaling_model", None)


def test_conv_flop_formula_on_a_toy_layer(sm):
    assert sm.conv_flops(3, 2, 4, 5, 5) == 2 * 3 * 3 * 2 * 4 * 5 * 5
    assert sm.conv_flops(1, 1, 1, 1, 1) == 2
    with pytest.raises(ValueError, match="k=0"):
        sm.conv_flops(0, 2, 4, 5, 5)


def test_architecture_table_is_the_papers(sm):
    layers = sm.unet_layers(512, 8)
    assert [(l.k, l.cout, l.h_out) for l in layers[:8]] == [
        (7, 64, 256), (5, 128, 128), (5, 256, 64), (3, 512, 32), (3, 512, 16), (3, 512, 8), (3, 512, 4), (3, 512, 2)]
    assert [(l.cin, l.cout, l.h_out) for l in layers[8:]] == [
        (1024, 512, 4), (1024, 512, 8), (1024, 512, 16), (1024, 512, 32), (768, 256, 64), (384, 128, 128),
        (192, 64, 256), (67, 3, 512)]
    assert sm.unet_params(8) == pytest.approx(32.9e6, rel=0.002)
    with pytest.raises(ValueError, match="not divisible"):
        sm.unet_layers(500, 8)


def test_parameter_count_matches_the_real_model(sm):
    from pconv.core.unet import build_model

    for layer_size in (5, 8):
        model = build_model(layer_size)
        assert sm.unet_params(layer_size) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_step_flops_match_torch_flop_counter_on_the_real_model_and_loss(sm):
    """Forward + backward of PConvUNet + InpaintingLoss, counted by torch at 64 px, equals the analytic count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor
    from pconv.core.unet import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    size, layer_size, batch = 64, 5, 2
    model = build_model(layer_size).train()
    loss = InpaintingLoss(VGG16FeatureExtractor(weights="random"))
    image = torch.rand(batch, 3, size, size)
    mask = (torch.rand(batch, 1, size, size) > 0.3).float()
    with FlopCounterMode(display=False) as counter:
        out, _ = model(image, mask)
        loss(mask, out, image)["total"].backward()
    expected = sm.step_flops(size, layer_size)
    assert counter.get_total_flops() / batch == pytest.approx(expected.total, rel=1e-6)
    with FlopCounterMode(display=False) as counter:
        model(image, mask)
    assert counter.get_total_flops() / batch == pytest.approx(expected.unet_forward, rel=1e-6)


def test_ring_allreduce_formula(sm):
    assert sm.ring_allreduce_s(1e8, 1, 100.0, 1e-5) == 0.0
    assert sm.ring_allreduce_s(1e8, 4, 100.0, 0.0) == pytest.approx(2 * 3 / 4 * 1e8 / 1e11)
    assert sm.ring_allreduce_s(1e8, 4, 100.0, 1e-5) == pytest.approx(2 * 3 / 4 * 1e-3 + 6e-5)


def test_buckets_cover_all_gradients(sm):
    flops = sm.step_flops(512, 8)
    cap = 25 * 2 ** 20
    bks = sm.buckets(flops.per_layer_backward, cap, 4)
    assert sum(b for _, b in bks) == sm.unet_params(8) * 4
    assert all(b >= cap for _, b in bks[:-1])
    assert [i for i, _ in bks] == sorted(i for i, _ in bks) and bks[-1][0] == len(flops.per_layer_backward) - 1


def test_efficiency_is_at_most_one_and_falls_with_the_number_of_nodes(sm):
    preds = [sm.predict(n) for n in (1, 8, 16, 32, 64)]
    assert preds[0].efficiency == pytest.approx(1.0) and preds[0].exposed_comm_s == 0.0
    assert all(0 < p.efficiency <= 1.0 + 1e-12 for p in preds)
    assert all(a.efficiency >= b.efficiency for a, b in zip(preds, preds[1:]))
    assert preds[-1].efficiency < preds[1].efficiency, "crossing the network must cost something"
    assert all(a.images_per_s < b.images_per_s for a, b in zip(preds, preds[1:]))
    with pytest.raises(ValueError):
        sm.predict(0)


def test_bandwidth_batch_and_gradient_precision_help(sm):
    base = sm.predict(64)
    fast_net = sm.Hardware(node=dataclasses.replace(sm.NODE_TYPES["p3.16xlarge"], network_gbit=1e6))
    assert sm.predict(64, hw=fast_net).efficiency > 0.99
    assert sm.predict(64, sm.TrainSetup(batch_per_gpu=12)).efficiency > base.efficiency
    assert sm.predict(64, sm.TrainSetup(grad_bytes=2)).efficiency > base.efficiency
    slow_cpu = sm.predict(8, sm.TrainSetup(cpu_ms_per_sample=1000.0))
    assert slow_cpu.data_cpu_load == pytest.approx(1.0) and slow_cpu.step_s == slow_cpu.data_s


def test_calibration_recovers_the_utilisation(sm):
    hw = sm.Hardware(mfu=0.17)
    step_ms = sm.predict(1, hw=hw).step_s * 1e3
    assert sm.calibrate_mfu(step_ms, sm.TrainSetup(), sm.Hardware()) == pytest.approx(0.17)
    with pytest.raises(ValueError):
        sm.calibrate_mfu(0.0, sm.TrainSetup(), hw)


def test_cli_prints_the_table_and_the_90_percent_choices(sm, capsys):
    assert sm.main(["--measured-step-ms", "200"]) == 0
    out = capsys.readouterr().out
    assert "calibrated utilisation" in out
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) == 10 and r[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "8", "16", "32", "64"]
    assert rows[0][8] == "100.0%" and all(0 < float(r[8].rstrip("%")) <= 100 for r in rows)
    assert "efficiency >= 90%" in out and "64 GPUs:" in out
