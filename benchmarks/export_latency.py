#!/usr/bin/env python
"""Inference latency of the exported net: p50 at SIZE x SIZE for eager PyTorch, TorchScript and ONNX Runtime, as
ratios to eager, all measured in one process on the same inputs (interleaved per repeat, so machine noise hits all
three alike).

The net is the paper's U-Net at SIZE (layer_size 8 at 512 px, random weights: latency does not depend on them),
exported with pconv.inference.export exactly as `pconv export` writes it; each runtime gets the same number of
threads (torch's intra-op threads = ONNX Runtime's intra_op_num_threads). The exports are checked against eager
(max |difference|) before timing. Prints one line per runtime and

    ratio torchscript/eager (cpu, 512px): 0.98
    ratio onnxruntime/eager (cpu, 512px): 0.74

  python benchmarks/export_latency.py                # 512 px, 10 repeats
  python benchmarks/export_latency.py --size 256 --repeats 3 --layer-size 4   # a quick run (CI's smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pconv.core.unet import build_model, default_layer_size  # noqa: E402
from pconv.inference.export import RawPrediction, export_onnx, export_torchscript  # noqa: E402


def runners(net: torch.nn.Module, folder: Path, threads: int) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """name -> run(image, mask) for eager, TorchScript and ONNX Runtime on the same net."""
    import onnxruntime

    raw = RawPrediction(net).eval()
    export_torchscript(net, folder / "net.pt")
    export_onnx(net, folder / "net.onnx")
    scripted = torch.jit.load(str(folder / "net.pt"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / "net.onnx"), options, providers=["CPUExecutionProvider"])

    def eager(image, mask):
        with torch.inference_mode():
            return raw(torch.from_numpy(image), torch.from_numpy(mask)).numpy()

    def torchscript(image, mask):
        with torch.inference_mode():
            return scripted(torch.from_numpy(image), torch.from_numpy(mask)).numpy()

    def onnxruntime_run(image, mask):
        return session.run(None, {"image": image, "mask": mask})[0]

    return {"eager": eager, "torchscript": torchscript, "onnxruntime": onnxruntime_run}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--layer-size", type=int, default=None, help="U-Net depth (default: the paper's for --size)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per runtime (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runtime first (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every runtime")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model(args.layer_size or default_layer_size(args.size)).eval()
    rng = np.random.default_rng(0)
    mask = (rng.random((1, 1, args.size, args.size)) > 0.25).astype(np.float32)
    image = (rng.random((1, 3, args.size, args.size)) * mask).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="pconv-export-bench-") as tmp:
        runs = runners(net, Path(tmp), args.threads)
        reference = runs["eager"](image, mask)
        for name, run in runs.items():
            diff = float(np.abs(run(image, mask) - reference).max())
            print(f"{name}: max |difference| to eager {diff:.2e}")
            for _ in range(args.warmup):
                run(image, mask)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # alternate: drift hits all alike
            for name in order:
                start = time.perf_counter()
                runs[name](image, mask)
                times[name].append(time.perf_counter() - start)
    p50 = {name: statistics.median(t) for name, t in times.items()}
    print(f"cpu, {args.size}px, batch 1, layer_size {net.layer_size}, {args.threads} threads, {args.repeats} repeats")
    for name, seconds in p50.items():
        print(f"{name}: p50 {seconds * 1000:.1f} ms")
    for name in ("torchscript", "onnxruntime"):
        print(f"ratio {name}/eager (cpu, {args.size}px): {p50[name] / p50['eager']:.2f}")
    return p50


if __name__ == "__main__":
    main()
