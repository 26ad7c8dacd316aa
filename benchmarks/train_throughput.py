#!/usr/bin/env python
"""Images/s of the full training step (PConv U-Net + VGG16 loss + Adam) through Ray Train vs a plain process.

The same step function runs (a) in this process, (b) in a Ray Train TorchTrainer with 1 worker and (c) with
2 workers (DDP over gloo/NCCL), on the same synthetic batches, so the ratio is the overhead of the
distributed path (target: <= 5% at 1 worker). Data loading is left out on purpose (see data_throughput.py).
Measurement runs interleave with the baseline in this process and report medians.

  python benchmarks/train_throughput.py                      # CPU, 128 px, batch 2 per worker
  python benchmarks/train_throughput.py --device cuda --image-size 512 --batch 6   # a V100/A100/H100, AMP
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step_loop(config: dict) -> dict:
    """Warm up, then time `steps` training steps; returns images/s of this worker (x world size for DDP)."""
    from pconv.core.losses import InpaintingLoss, VGG16FeatureExtractor
    from pconv.core.unet import build_model
    from pconv.train.state import AmpSettings

    in_ray = config.get("ray", False)
    world = 1
    if in_ray:
        import ray.train
        import ray.train.torch

        device = ray.train.torch.get_device()
        world = ray.train.get_context().get_world_size()
    else:
        device = torch.device(config["device"])
    torch.manual_seed(0)
    model = build_model(config["layer_size"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model) if in_ray else model.to(device)
    loss_fn = InpaintingLoss(VGG16FeatureExtractor(weights="random")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    amp = AmpSettings.choose("auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)
    b, s = config["batch"], config["image_size"]
    image = torch.rand(b, 3, s, s, device=device)
    mask = (torch.rand(b, 1, s, s, device=device) > 0.3).float()

    def one() -> None:
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            out, _ = model(image, mask)
            total = loss_fn(mask, out.float(), image)["total"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(config["warmup"]):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(config["steps"]):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ips = b * world * config["steps"] / (time.perf_counter() - t0)
    if in_ray and ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 attaches metrics to checkpoints only; hand the figure back through a file.
        with open(config["result_file"], "w") as fh:
            fh.write(str(ips))
    return {"images_per_s": ips}


def through_ray(config: dict, workers: int, use_gpu: bool) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    import tempfile

    cpus = max(1, torch.get_num_threads() // workers) if not use_gpu else 2
    result_file = tempfile.mktemp(prefix="bench-ips-")
    trainer = TorchTrainer(step_loop, train_loop_config={**config, "ray": True, "result_file": result_file},
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-")))
    trainer.fit()
    with open(result_file) as fh:
        return float(fh.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=None, help="default: 128 on CPU, 512 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="per-worker batch (default: 2 on CPU, 6 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians reported)")
    p.add_argument("--max-workers", type=int, default=2)
    args = p.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    size = args.image_size or (512 if device == "cuda" else 128)
    batch = args.batch or (6 if device == "cuda" else 2)
    from pconv.core.unet import default_layer_size

    config = {"device": device, "image_size": size, "batch": batch, "layer_size": default_layer_size(size),
              "steps": args.steps, "warmup": args.warmup}
    import ray

    ray.init(num_cpus=max(2, torch.get_num_threads()) + 1, include_dashboard=False, log_to_driver=False)
    use_gpu = device == "cuda"
    results: dict[str, list[float]] = {"plain": []}
    counts = [w for w in (1, 2) if w <= args.max_workers and (not use_gpu or w <= torch.cuda.device_count())]
    for w in counts:
        results[f"ray{w}"] = []
    for _ in range(args.repeats):
        results["plain"].append(step_loop(config)["images_per_s"])
        for w in counts:
            results[f"ray{w}"].append(through_ray(config, w, use_gpu))
    plain = statistics.median(results["plain"])
    print(f"device={device} image_size={size} batch/worker={batch} steps={args.steps} repeats={args.repeats}")
    print(f"plain single process: {plain:.2f} images/s")
    for w in counts:
        r = statistics.median(results[f"ray{w}"])
        print(f"ray train, {w} worker(s): {r:.2f} images/s")
        print(f"ratio raytrain{w}/plain ({device}, {size}px): {r / plain:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
