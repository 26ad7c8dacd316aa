"""What only a GPU can show (marked `gpu`; skipped without CUDA): mixed precision through the phase switch, bf16,
channels_last, `torch.compile`, and inference / super-resolution on CUDA equal to CPU within tolerance.
benchmarks/gpu_check.py runs this subset first on a lent GPU machine (`make gpu-check`)."""

from __future__ import annotations

import pytest
import torch

from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor
from pconv.core.unet import build_model
from pconv.inference.inpaint import inpaint
from pconv.inference.super_resolve import super_resolve
from pconv.train.state import AmpSettings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")]
CUDA = torch.device("cuda")
LAYER_SIZE, SIZE, BATCH = 5, 64, 4


def batch(seed: int = 0, size: int = SIZE, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.3).float()
    return torch.rand(n, 3, size, size, generator=g), mask


def train_steps(amp: AmpSettings, steps: int, phase_switch_at: int, channels_last: bool = False,
                compiled: bool = False) -> tuple[list[float], torch.nn.Module, torch.amp.GradScaler, list]:
    """The training rule on CUDA (pconv.train.loop: AmpSettings, phase 2 = encoder BN frozen at the paper's 5e-5):
    ``steps`` Adam steps on fixed batches; returns the losses, the model, the scaler and the encoder BN running
    means at the phase switch."""
    torch.manual_seed(0)
    model = build_model(LAYER_SIZE).to(CUDA).train()
    loss_fn = InpaintingLoss(VGG16FeatureExtractor("random")).to(CUDA)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp.use_scaler)
    losses, at_switch = [], []
    for step in range(steps):
        if step == phase_switch_at:
            at_switch = [bn.running_mean.clone() for bn in model.encoder_batch_norms()]
            model.freeze_encoder_bn()
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
        image, mask = (t.to(CUDA) for t in batch(step % 2))
        x = image * mask
        if channels_last:
            x, mask = x.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp.dtype, enabled=amp.enabled):
            output, _ = step_model(x, mask)
            total = loss_fn(mask, output.float(), image)["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(total))
    return losses, model, scaler, at_switch


def test_fp16_with_grad_scaler_through_the_phase_switch():
    losses, model, scaler, at_switch = train_steps(AmpSettings(True, torch.float16, True), steps=8, phase_switch_at=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert scaler.get_scale() > 0 and model.encoder_bn_frozen
    # phase 2 (4 fp16 steps) left the encoder's BN statistics where the switch found them
    assert at_switch and all(torch.equal(a, bn.running_mean) for a, bn in zip(at_switch, model.encoder_batch_norms()))


def test_bf16_trains_and_tracks_fp32():
    bf16, *_ = train_steps(AmpSettings(True, torch.bfloat16, False), steps=4, phase_switch_at=2)
    fp32, *_ = train_steps(AmpSettings(False, None, False), steps=4, phase_switch_at=2)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert abs(bf16[0] - fp32[0]) <= 0.05 * abs(fp32[0])  # the first loss: same weights and data, bf16 rounding


def test_channels_last_equals_contiguous():
    plain, *_ = train_steps(AmpSettings(False, None, False), steps=3, phase_switch_at=2)
    nhwc, *_ = train_steps(AmpSettings(False, None, False), steps=3, phase_switch_at=2, channels_last=True)
    assert torch.allclose(torch.tensor(nhwc), torch.tensor(plain), rtol=1e-3)


def test_compiled_equals_eager():
    eager, *_ = train_steps(AmpSettings(False, None, False), steps=3, phase_switch_at=2)
    compiled, *_ = train_steps(AmpSettings(False, None, False), steps=3, phase_switch_at=2, compiled=True)
    assert torch.allclose(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3)


def test_inference_and_super_resolution_on_cuda_equal_cpu():
    torch.manual_seed(1)
    net = build_model(LAYER_SIZE).eval()
    image, mask = batch(3, size=100, n=2)  # not a multiple of the stride: padding on both devices
    on_cpu = inpaint(net, image, mask, device="cpu")
    on_cuda = inpaint(net, image, mask, device="cuda").cpu()
    assert (on_cuda - on_cpu).abs().max() <= 1e-3
    lr = (torch.rand(3, 21, 33, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    hr_cpu = super_resolve(net, lr, 2, device="cpu")
    hr_cuda = super_resolve(net, lr, 2, device="cuda").cpu()
    assert (hr_cuda.int() - hr_cpu.int()).abs().max() <= 1  # uint8 rounding of a 1e-3 difference
