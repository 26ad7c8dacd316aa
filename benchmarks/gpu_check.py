#!/usr/bin/env python
"""One-shot GPU check: run it unchanged on a lent H100/H200 (or any CUDA machine) in under 8 minutes; it prints ONE
table and exits non-zero when any check fails.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run         # CPU, tiny sizes, the same code paths (CI runs this)

Rows:
- the test subset marked `gpu` (tests/test_gpu.py: fp16 + GradScaler through the phase switch, bf16, channels_last,
  --compile, inference and SR on CUDA equal to CPU);
- the training step (forward + backward of the U-Net and the paper's loss, optimiser step) at 512 px, batch 6, in
  fp16 and bf16, eager and compiled, as images/s and as a ratio to a plain-conv U-Net of the same shapes in the same
  process (benchmarks/train_step.py's floor);
- MFU: the step's FLOPs counted by torch.utils.flop_counter over the GPU's dense fp16/bf16 peak;
- what a host read of the step's loss terms costs per step (the loop keeps its sums on the device and reads them at
  log time; this row shows the cost that avoids);
- what the loop's finiteness check costs per step: ``WorkerContext.every_rank(isfinite(loss))``, an all-reduce and a
  host read between forward and backward, so the device idles while the host queues the backward (on one GPU the
  all-reduce is a no-op: the row is the host read; N GPUs add one small NCCL all-reduce). Both steps are timed with
  a sync after each, as the loop's data agreement at the start of every step syncs anyway;
- inference p50 at 512² (pad + net + composite), against the paper's 0.23 s on a V100 (Liu et al. 2018, Sec. 5);
- serve p50 at 512², in-process vs HTTP through Ray Serve (benchmarks/serve_latency.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pconv.core.config import TrainConfig  # noqa: E402
from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor  # noqa: E402
from pconv.core.unet import build_model, default_layer_size  # noqa: E402
from pconv.inference.inpaint import inpaint  # noqa: E402
from pconv.train.state import AmpSettings, WorkerContext  # noqa: E402

PAPER_INFERENCE_S = 0.23  # Liu et al. 2018, Sec. 5: 0.23 s per 512x512 image on a V100 (their reported speed)
# Dense fp16/bf16 tensor-core peaks (vendor data sheets, SXM parts): what MFU is measured against.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12,
              "T4": 65e12}


@dataclass
class Settings:
    device: torch.device
    size: int
    batch: int
    layer_size: int
    repeats: int
    warmup: int
    serve_requests: int


def settings(dry_run: bool) -> Settings:
    if dry_run:
        return Settings(torch.device("cpu"), 64, 2, 4, 2, 1, 2)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run to check the script on a CPU")
    return Settings(torch.device("cuda"), 512, 6, default_layer_size(512), 10, 3, 12)


@dataclass
class Row:
    check: str
    result: str
    detail: str = ""
    ok: bool = True


def guarded(name: str, rows: list[Row], body: Callable[[], list[Row]]) -> None:
    """Run one group of checks; an exception becomes a FAILED row (the table is still printed)."""
    try:
        rows.extend(body())
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table, then the exit status
        traceback.print_exc()
        rows.append(Row(name, "FAILED", f"{type(exc).__name__}: {exc}"[:150], ok=False))


def gpu_tests(dry_run: bool) -> list[Row]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                           "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=360)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = proc.returncode == 0 and (dry_run or "passed" in summary and "skipped" not in summary)
    if not ok:
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
    return [Row("tests marked gpu", "ok" if ok else "FAILED", summary, ok)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(s: Settings, dtype: torch.dtype | None, compiled: bool, read_loss: bool = False,
              check_finite: bool = False):
    """One training step of the U-Net + the paper's loss (random VGG: the same FLOPs), as a closure; with
    ``check_finite``, the training loop's finiteness check between forward and backward (one worker)."""
    torch.manual_seed(0)
    model = build_model(s.layer_size).to(s.device).train()
    loss_fn = InpaintingLoss(VGG16FeatureExtractor("random")).to(s.device)
    fmt = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compiled:
        model.compile()
        loss_fn.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler(s.device.type, enabled=dtype == torch.float16 and s.device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(s.batch, 1, s.size, s.size, generator=g) > 0.3).float().to(s.device)
    image = torch.rand(s.batch, 3, s.size, s.size, generator=g).to(s.device)
    x, mask = (image * mask).contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)
    worker = WorkerContext(TrainConfig(), 0, 1, s.device, AmpSettings(dtype is not None, dtype, scaler.is_enabled()),
                           None)

    def step() -> None:
        with torch.autocast(s.device.type, dtype=dtype, enabled=dtype is not None):
            output, _ = model(x, mask)
            terms = loss_fn(mask, output.float(), image)
        optimizer.zero_grad(set_to_none=True)
        if check_finite and not worker.every_rank(torch.isfinite(terms["total"].detach())):
            return  # the loop skips the step on every rank (never here: the loss is finite)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        if read_loss:
            [float(v) for v in terms.values()]  # what a per-step host read of the loss terms costs

    return step, model, loss_fn, (x, mask, image)


def timed(step: Callable[[], None], s: Settings) -> float:
    """Median seconds per call after ``s.warmup`` calls."""
    for _ in range(s.warmup):
        step()
    sync(s.device)
    times = []
    for _ in range(s.repeats):
        start = time.perf_counter()
        step()
        sync(s.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_flops(s: Settings) -> float:
    """FLOPs of one forward + backward of the net and the loss at the settings' size (fp32 counting)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, model, loss_fn, (x, mask, image) = make_step(s, None, compiled=False)
    with FlopCounterMode(display=False) as counter:
        output, _ = model(x, mask)
        loss_fn(mask, output, image)["total"].backward()
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def train_rows(s: Settings) -> list[Row]:
    from train_step import bench  # the plain-conv floor of benchmarks/train_step.py

    rows, flops, peak = [], step_flops(s), peak_flops(s.device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if s.device.type == "cuda" else {"fp32": None}
    for name, dtype in dtypes.items():
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            seconds = timed(make_step(s, dtype, compiled)[0], s)
            floor = bench(s.device, s.size, s.batch, s.layer_size, s.repeats, s.warmup, dtype, compiled=compiled)
            mfu = f", MFU {flops / seconds / peak:.1%}" if peak else ""
            rows.append(Row(f"train step {s.size}px b{s.batch} {name} {mode}", f"{s.batch / seconds:.1f} img/s",
                            f"net/plain-conv {floor.ratio:.2f}{mfu} ({flops / 1e9:.0f} GFLOP/step)"))
    dtype = next(iter(dtypes.values()))
    without = timed(make_step(s, dtype, False)[0], s)
    with_read = timed(make_step(s, dtype, False, read_loss=True)[0], s)
    rows.append(Row("host read of loss terms", f"{(with_read - without) * 1e3:+.1f} ms/step",
                    f"{with_read / without - 1:+.1%} of an eager step (the loop reads them at log time only)"))
    with_check = timed(make_step(s, dtype, False, check_finite=True)[0], s)
    rows.append(Row("finiteness check per step", f"{(with_check - without) * 1e3:+.1f} ms/step",
                    f"{with_check / without - 1:+.1%} of an eager step: the loop's all-reduce + host read of "
                    "isfinite(loss) between forward and backward (1 GPU: the read)"))
    return rows


def inference_rows(s: Settings) -> list[Row]:
    net = build_model(default_layer_size(s.size) if s.device.type == "cuda" else s.layer_size).eval()
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, s.size, s.size, generator=g) > 0.3).float()
    image = torch.rand(3, s.size, s.size, generator=g)
    net = net.to(s.device)
    seconds = timed(lambda: inpaint(net, image, mask, device=s.device), s)
    return [Row(f"inference p50 {s.size}²", f"{seconds * 1e3:.1f} ms",
                f"paper: {PAPER_INFERENCE_S * 1e3:.0f} ms on a V100 ({PAPER_INFERENCE_S / seconds:.1f}x that speed)")]


def serve_rows(s: Settings) -> list[Row]:
    from serve_latency import measure_paths

    rows = measure_paths(None, s.size, s.serve_requests, [1], device=s.device.type, batch_sizes=(1,))
    base, http = rows[("in-process", 1)], rows[("http batch=1", 1)]
    ok = http["ok"] == 1.0
    return [Row(f"serve p50 {s.size}²", f"{http['p50'] * 1e3:.1f} ms HTTP" if ok else "FAILED",
                f"in-process {base['p50'] * 1e3:.1f} ms, HTTP + Serve {http['p50'] / base['p50'] - 1:+.1%}", ok)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes (CI: the script runs)")
    parser.add_argument("--skip-serve", action="store_true", help="leave out the Ray Serve row")
    args = parser.parse_args(argv)
    s = settings(args.dry_run)
    start = time.perf_counter()
    device = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu (dry run)"
    rows: list[Row] = []
    guarded("tests marked gpu", rows, lambda: gpu_tests(args.dry_run))
    guarded("train step", rows, lambda: train_rows(s))
    guarded("inference", rows, lambda: inference_rows(s))
    if not args.skip_serve:
        guarded("serve", rows, lambda: serve_rows(s))
    width = max(len(r.check) for r in rows)
    print(f"\ngpu_check on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s")
    print(f"| {'check':<{width}} | {'result':<16} | detail |")
    print(f"|{'-' * (width + 2)}|{'-' * 18}|--------|")
    for r in rows:
        print(f"| {r.check:<{width}} | {r.result:<16} | {r.detail} |")
    failed = [r.check for r in rows if not r.ok]
    print("gpu_check: " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
