"""Training-step cost of the PConv U-Net against the floor any PConv net can reach.

The floor is a plain-convolution U-Net of identical shapes: the same channels, kernels, strides, biases, BN,
activations, nearest upsampling and concatenations, with ``nn.Conv2d`` and no masks. Both run forward + backward
(+ zeroing gradients) on the same inputs, interleaved in one process (alternating order, several repeats), so
machine noise hits both alike; the ratio is the median of the per-repeat ratios of adjacent runs. Each pair runs eager
and compiled (``torch.compile`` of both modules in place, as ``--compile`` does in training; the untimed warm-up steps
absorb the compilation, whose time is printed). Prints per-model median milliseconds, on CPU the process CPU-time
ratio too (robust when other processes compete for the cores: a wall-clock ratio on a loaded machine mostly measures
the scheduler), compiled/eager per model, and one line per mode

    ratio pconv/plain (cpu, 256px, batch 2, eager): 1.02
    ratio pconv/plain (cpu, 256px, batch 2, compiled): 1.02

(target for the compiled step: <= 1.10). ``--mode eager`` skips the compilation (minutes on a small CPU). Eager and
compiled run one after the other, so compiled/eager is more exposed to machine drift than the paired ratios.

CPU: 256 px, batch 2, layer_size 7, fp32. CUDA (when present): 512 px, layer_size 8, AMP (the training rule,
``pconv.train.state.AmpSettings``: bf16 at compute capability 8.0+, fp16 below), channels_last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pconv.core.unet import LEAKY_RELU_SLOPE, PConvUNet, decoder_spec, encoder_spec  # noqa: E402
from pconv.train.state import AmpSettings  # noqa: E402


COMPILED_TARGET = 1.10  # issue 14: the compiled PConv step within 10 % of the plain-conv floor


class PlainUNet(nn.Module):
    """The PConv U-Net's exact shapes with ordinary convolutions and no masks (the benchmark's floor)."""

    def __init__(self, layer_size: int, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        enc, c = [], in_channels
        for kernel, out, bn in encoder_spec(layer_size):
            enc.append(nn.ModuleDict({"conv": nn.Conv2d(c, out, kernel, 2, kernel // 2, bias=not bn),
                                      "bn": nn.BatchNorm2d(out) if bn else nn.Identity()}))
            c = out
        self.encoder = nn.ModuleList(enc)
        self.decoder = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv2d(below + skip, out, 3, 1, 1, bias=not bn),
                           "bn": nn.BatchNorm2d(out) if bn else nn.Identity()})
            for below, skip, out, bn in decoder_spec(layer_size, in_channels, out_channels))

    def forward(self, image: Tensor) -> Tensor:
        skips, h = [image], image
        for block in self.encoder:
            h = F.relu_(block["bn"](block["conv"](h)))
            skips.append(h)
        skips.pop()
        for i, block in enumerate(self.decoder):
            up = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block["conv"](torch.cat([up, skips.pop().to(up.dtype)], dim=1))
            if i < len(self.decoder) - 1:
                h = F.leaky_relu_(block["bn"](h), LEAKY_RELU_SLOPE)
        return h


def random_mask(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Irregular-ish holes: random rectangles covering roughly a third of the image (1 = valid)."""
    mask = torch.ones(batch, 1, size, size)
    for n in range(batch):
        for _ in range(12):
            h, w = (int(v) for v in torch.randint(size // 16, size // 4, (2,), generator=generator))
            y, x = (int(v) for v in torch.randint(0, size - size // 4, (2,), generator=generator))
            mask[n, :, y:y + h, x:x + w] = 0
    return mask


def time_step(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


@dataclass
class Result:
    pconv_ms: float        # median wall-clock ms per step
    plain_ms: float
    ratio: float           # median over repeats of the paired (adjacent-in-time) wall-clock ratios
    cpu_ratio: float       # the same for process CPU time (less sensitive to other processes on the machine)
    pconv_first_s: float = 0.0  # the first (warm-up) step: compilation included when compiled
    plain_first_s: float = 0.0


def bench(device: torch.device, size: int, batch: int, layer_size: int, repeats: int, warmup: int,
          amp_dtype: torch.dtype | None, compiled: bool = False) -> Result:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=gen)
    mask = random_mask(batch, size, gen)
    pconv, plain = PConvUNet(layer_size).to(device).train(), PlainUNet(layer_size).to(device).train()
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    pconv, plain = pconv.to(memory_format=fmt), plain.to(memory_format=fmt)
    image = image.to(device).contiguous(memory_format=fmt)
    mask = mask.to(device).contiguous(memory_format=fmt)
    n_pconv = sum(p.numel() for p in pconv.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_pconv == n_plain, (n_pconv, n_plain)
    if compiled:  # in place, as pconv.train.loop does for --compile
        pconv.compile()
        plain.compile()

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def step_pconv() -> None:
        pconv.zero_grad(set_to_none=True)
        with autocast():
            out, _ = pconv(image, mask)
        out.float().square().mean().backward()

    def step_plain() -> None:
        plain.zero_grad(set_to_none=True)
        with autocast():
            out = plain(image)
        out.float().square().mean().backward()

    first = {"pconv": time_step(step_pconv, device)[0] / 1e3, "plain": time_step(step_plain, device)[0] / 1e3}
    for _ in range(warmup - 1):
        step_pconv()
        step_plain()
    times: dict[str, list[tuple[float, float]]] = {"pconv": [], "plain": []}
    for r in range(repeats):
        order = [("pconv", step_pconv), ("plain", step_plain)]
        for name, step in order if r % 2 == 0 else reversed(order):
            times[name].append(time_step(step, device))
    pairs = list(zip(times["pconv"], times["plain"]))
    return Result(pconv_ms=statistics.median(t[0] for t in times["pconv"]),
                  plain_ms=statistics.median(t[0] for t in times["plain"]),
                  ratio=statistics.median(p[0] / q[0] for p, q in pairs),
                  cpu_ratio=statistics.median(p[1] / q[1] for p, q in pairs),
                  pconv_first_s=first["pconv"], plain_first_s=first["plain"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU always, plus CUDA when a GPU is present")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (>= 1)")
    parser.add_argument("--mode", choices=("both", "eager", "compiled"), default="both",
                        help="eager, torch.compile'd, or both (default; compiling takes minutes on a small CPU)")
    parser.add_argument("--layer-size", type=int, default=None, help="U-Net depth (default: the image size's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cpu-size", type=int, default=256)
    parser.add_argument("--cuda-size", type=int, default=512)
    parser.add_argument("--cuda-batch", type=int, default=None, help="batch on CUDA (default: --batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from pconv.core.unet import default_layer_size

    runs = []
    if args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), args.cpu_size, args.batch, None))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda but no GPU is available")
        amp = AmpSettings.choose("auto", torch.device("cuda")).dtype  # the training rule: fp16 below sm80
        runs.append((torch.device("cuda"), args.cuda_size, args.cuda_batch or args.batch, amp))
    modes = ("eager", "compiled") if args.mode == "both" else (args.mode,)
    for device, size, batch, amp in runs:
        layer_size = args.layer_size or default_layer_size(size)
        label = f"{device.type}, {size}px, batch {batch}" + (f", {str(amp).removeprefix('torch.')} autocast"
                                                              if amp else "")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"[{label}; layer_size {layer_size}; {name}; torch {torch.__version__}]", flush=True)
        results = {}
        for mode in modes:
            res = results[mode] = bench(device, size, batch, layer_size, args.repeats, args.warmup, amp,
                                        compiled=mode == "compiled")
            print(f"  {mode:8s} pconv forward+backward: {res.pconv_ms:8.1f} ms, plain: {res.plain_ms:8.1f} ms "
                  f"(median of {args.repeats}; first step {res.pconv_first_s:.1f} s / {res.plain_first_s:.1f} s)")
            if device.type == "cpu":
                print(f"  {mode:8s} process CPU-time ratio pconv/plain: {res.cpu_ratio:.2f}")
        if len(results) == 2:
            eager, comp = results["eager"], results["compiled"]
            print(f"  compiled/eager (separate runs): pconv {comp.pconv_ms / eager.pconv_ms:.2f}, "
                  f"plain {comp.plain_ms / eager.plain_ms:.2f}")
        for mode, res in results.items():
            target = f" (target <= {COMPILED_TARGET:.2f}: {'met' if res.ratio <= COMPILED_TARGET else 'NOT met'})"
            print(f"ratio pconv/plain ({label}, {mode}): {res.ratio:.2f}{target if mode == 'compiled' else ''}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
