"""Precision by hardware: amp=auto reads the GPU's compute capability (fp16 + GradScaler below sm80, bf16 at sm80+,
off on CPU), and the training-step benchmark uses the same rule."""

from __future__ import annotations

import pytest
import torch

from pconv.train.state import AmpSettings

from conftest import load_benchmark


@pytest.fixture
def capability(monkeypatch):
    """Pretend the CUDA device has the given compute capability; bf16 'support' is reported as True everywhere
    (as torch does on sm70 through emulation), so a rule that asked torch.cuda.is_bf16_supported() would fail."""
    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return set_capability


@pytest.mark.parametrize("cap, dtype, scaler", [
    ((7, 0), torch.float16, True),    # V100
    ((7, 5), torch.float16, True),    # T4
    ((8, 0), torch.bfloat16, False),  # A100
    ((9, 0), torch.bfloat16, False),  # H100
])
def test_auto_precision_follows_compute_capability(capability, cap, dtype, scaler):
    capability(*cap)
    amp = AmpSettings.choose("auto", torch.device("cuda"))
    assert (amp.enabled, amp.dtype, amp.use_scaler) == (True, dtype, scaler)


def test_auto_is_off_on_cpu_and_explicit_modes_are_obeyed(capability):
    capability(7, 0)
    assert AmpSettings.choose("auto", torch.device("cpu")) == AmpSettings(False, None, False)
    assert AmpSettings.choose("off", torch.device("cuda")) == AmpSettings(False, None, False)
    assert AmpSettings.choose("bf16", torch.device("cuda")) == AmpSettings(True, torch.bfloat16, False)
    assert AmpSettings.choose("fp16", torch.device("cuda")) == AmpSettings(True, torch.float16, True)
    assert AmpSettings.choose("fp16", torch.device("cpu")).use_scaler is False  # GradScaler is a CUDA tool here


@pytest.mark.parametrize("cap, dtype", [((7, 0), torch.float16), ((9, 0), torch.bfloat16)])
def test_train_step_benchmark_uses_the_training_rule(monkeypatch, capability, cap, dtype, capsys):
    bench_mod = load_benchmark("train_step")
    capability(*cap)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    seen = []

    def fake_bench(device, size, batch, layer_size, repeats, warmup, amp_dtype, **kwargs):
        seen.append(amp_dtype)
        return bench_mod.Result(1.0, 1.0, 1.0, 1.0)

    monkeypatch.setattr(bench_mod, "bench", fake_bench)
    bench_mod.main(["--device", "cuda", "--repeats", "1"])
    assert seen and seen[-1] == dtype
