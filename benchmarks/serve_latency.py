#!/usr/bin/env python
"""Serving latency: p50/p99 and requests/s for SIZE x SIZE inpainting through the Ray Serve HTTP route
(POST /inpaint) vs a plain in-process call of the same model, at 1 and 8 concurrent clients, batching on and off.

The in-process call does the same byte-level work as a replica (decode the PNG image and mask, check them, inpaint,
encode the PNG: pconv.inference.pyfunc), so the ratio printed is what HTTP + Serve add. Target: overhead <= 15 % of the
in-process p50 at 1 client on CPU.

  flock /tmp/pconv-ray.lock python benchmarks/serve_latency.py                 # random full-size net, 512 px
  flock /tmp/pconv-ray.lock python benchmarks/serve_latency.py --model models:/pconv-unet@champion --requests 40
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pconv.tracking import checkpoints  # noqa: E402
from pconv.core.config import TrainConfig  # noqa: E402
from pconv.inference.inpaint import encode_image  # noqa: E402
from pconv.tracking.loading import load_model  # noqa: E402
from pconv.core.unet import build_model, default_layer_size  # noqa: E402
from pconv.inference.pyfunc import decode_request, inpaint_decoded  # noqa: E402


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def request_files(size: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(0)
    photo = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    hole = np.zeros((size, size), np.uint8)
    hole[size // 4:size // 2, size // 4:3 * size // 4] = 255
    return png(photo), png(hole)


def random_checkpoint(directory: Path, size: int) -> str:
    torch.manual_seed(0)
    layer = default_layer_size(size)
    cfg = TrainConfig(images="x", masks="y", image_size=size, layer_size=layer, run_name="bench", phase1_steps=1,
                      phase2_steps=0)
    state = {"model": build_model(layer).state_dict(), "optimizer": {}, "scaler": {}, "step": 0, "phase": 1,
             "epoch": 0, "data_seed": 0}
    return str(checkpoints.save(directory / "checkpoint_000000", state, cfg.to_yaml(), {"step": 0}))


def measure(call, clients: int, n: int) -> dict[str, float]:
    call()  # warm-up
    lat: list[float] = []

    def one(_):
        t = time.perf_counter()
        ok = call()
        lat.append(time.perf_counter() - t)
        return ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        oks = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "rps": n / wall, "ok": sum(oks) / n}


def measure_paths(uri: str | None, size: int, requests_per_row: int, clients: list[int], device: str = "auto",
                  port: int = 8765, batch_sizes: tuple[int, ...] = (1, 8)) -> dict[tuple[str, int], dict[str, float]]:
    """{(path, clients): {p50, p99, rps, ok}} for the in-process call and POST /inpaint through Ray Serve (one
    replica, each of ``batch_sizes``); ``uri`` None = a random full-size net for ``size``. Starts and stops a local
    Ray."""
    import ray
    from ray import serve

    from pconv.inference.serve import APP_NAME, build_app

    image, mask = request_files(size)
    with tempfile.TemporaryDirectory(prefix="pconv-bench-") as tmp:
        uri = uri or random_checkpoint(Path(tmp), size)
        model, info = load_model(uri, device="cuda" if device == "auto" and torch.cuda.is_available()
                                 else ("cpu" if device == "auto" else device))
        print(f"model {uri} (layer_size {info.layer_size}) on {next(model.parameters()).device}, "
              f"{size}x{size}, {requests_per_row} requests per row, torch threads {torch.get_num_threads()}")

        def in_process() -> bool:
            d = decode_request(image, mask, "white")
            return bool(encode_image(inpaint_decoded(model, [d])[0]))

        rows = {("in-process", c): measure(in_process, c, requests_per_row) for c in clients}
        ray.init(include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/inpaint"

        def http() -> bool:
            r = requests.post(url, files={"image": ("i.png", image), "mask": ("m.png", mask)},
                              data={"hole_color": "white"}, timeout=600)
            return r.status_code == 200

        cpus = float(ray.cluster_resources()["CPU"])  # all cores, as the in-process call has (Ray would set 1 thread)
        try:
            for batch in batch_sizes:
                serve.run(build_app(uri, min_replicas=1, max_replicas=1, max_ongoing_requests=16,
                                    max_queued_requests=64, num_cpus=cpus, max_batch_size=batch, device=device),
                          name=APP_NAME, route_prefix="/")
                for c in clients:
                    rows[(f"http batch={batch}", c)] = measure(http, c, requests_per_row)
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model URI (default: a random full-size net for --size)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--requests", type=int, default=16, help="requests per measurement")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--device", default="auto")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    rows = measure_paths(args.model, args.size, args.requests, clients, args.device, args.port)

    print(f"{'path':<16} {'clients':>7} {'p50 s':>8} {'p99 s':>8} {'req/s':>7} {'ok':>5} {'p50 vs in-process':>18}")
    for (path, c), r in rows.items():
        base = rows[("in-process", c)]["p50"]
        print(f"{path:<16} {c:>7} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['rps']:>7.2f} {r['ok']:>5.0%} "
              f"{r['p50'] / base - 1:>+17.1%}")
    overhead = rows[("http batch=1", clients[0])]["p50"] / rows[("in-process", clients[0])]["p50"] - 1
    print(f"HTTP + Serve overhead at {clients[0]} client(s), batching off: {overhead:+.1%} of the in-process p50 "
          f"(target <= 15 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
