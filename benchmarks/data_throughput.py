#!/usr/bin/env python
"""Throughput of the Ray Data training pipeline (S3 shards -> decoded, cropped, masked batches) vs two baselines.

Measured, all producing image / mask batches of IMAGE_SIZE x IMAGE_SIZE (--batch-dtype):

  raydata      what a training worker iterates: the epoch datasets of one rank (world 1) of
               pconv.data.stream.WorkerDatasets, one per epoch (dataset(epoch)), through iter_torch_batches with
               drop_last, over image shards in S3 (the local S3 server of pconv.apps.local_s3, started by this script,
               or --images/--masks URIs), Ray started with --cpus CPUs: uint8 rows from the read+decode tasks (the
               float32 mode converts them in the consumer with pconv.data.inputs.to_float_batch, as a CPU worker does).
  dataloader   torchvision ImageFolder + torch DataLoader (num_workers = --cpus) over the SAME images as files on
               local disk, with the same per-image work (resize short side, random crop, flip, a random augmented
               mask from the same mask set).
  floor        a plain loop in one fresh process over the same encoded bytes (a seeded sample of the epoch's
               images) doing the same per-image work as the pipeline's map function (decode, crop, flip, mask
               augmentation; output as --batch-dtype): the floor.
               Also reported, for reference: a decode+crop-only floor (no mask work), and the floor loop run in
               --cpus processes at once (how the machine's CPUs scale on this work with no pipeline at all).

Printed ratios (the targets of issue 3: >= 1.0 and >= 0.8):
  ratio raydata/dataloader: X
  ratio raydata/decode_floor_per_cpu: Y         (raydata images/s / (floor images/s x cpus))

By default the images are CBSD68 + the CelebA-HQ sample from ../shared/datasets, repeated --repeat times under
distinct keys so an epoch is long enough to measure, and the masks are a subset of the NVIDIA test masks.
The machine should be otherwise idle; all three measurements use the same number of CPUs. Epochs of the two
loaders are interleaved, the floor is measured again after each round of epochs, and medians are reported, so
background load (this VM's speed drifts by +-15 % over minutes) hits all three alike.

Output format (--batch-dtype): every loader delivers the same batches. uint8 (default) is what the training loop
consumes (it converts to float on its device, where that is free); float32 makes each loader convert on the CPU
(the Ray pipeline in its consumer, as the training loop does on a CPU worker; the DataLoader in its workers with
ToTensor).
On a small machine the driver and the local S3 server share the CPUs with the decode tasks; --cpus N below the
core count gives them the rest, which separates per-task efficiency from co-location overhead.

CPU accounting (Linux, benchmarks/cpu_account.py): during each Ray epoch the script reads /proc and prints where the
machine's CPU time went — Ray Data's decode tasks (the ray:: worker processes), the S3 server it started, this driver
process, Ray's own services, other processes, idle, and processes that exited during the epoch (their time is in
/proc/stat but no longer per process) — plus the decode tasks' CPU per image relative to the floor's, and the ceiling those shares put on the
per-CPU ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from cpu_account import CpuAccount  # benchmarks/cpu_account.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="existing image shard root (s3:// or local); default: build one on a moto S3 "
                                    "server from ../shared/datasets")
    p.add_argument("--masks", help="existing mask shard root; default: NVIDIA test masks subset (--n-masks)")
    p.add_argument("--image-size", type=int, default=512, help="training crop size (default 512, the paper's)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of all three loaders (default 16)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="CPUs for Ray (num_cpus) and DataLoader workers; the floor is scaled by it (default: all)")
    p.add_argument("--task-cpus", type=float, default=0.5,
                   help="CPU request of each Ray read/decode task (default 0.5, as in training)")
    p.add_argument("--batch-dtype", choices=("uint8", "float32"), default="uint8",
                   help="what every loader delivers: uint8 image/mask (default; what the training loop consumes, "
                        "converting on its device) or float32 (converted on the CPU by each loader)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="max concurrent Ray read/decode tasks (default: pconv.data.stream.default_concurrency)")
    p.add_argument("--repeat", type=int, default=8, help="copies of each default image (default 8: 992 images)")
    p.add_argument("--n-masks", type=int, default=600, help="NVIDIA masks to use by default (default 600)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs measured per loader after a warm-up epoch, interleaved (default 3; medians count)")
    p.add_argument("--floor-images", type=int, default=200, help="images timed in the floor loops (default 200)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------------------
def _default_sources(tmp: Path, repeat: int, n_masks: int) -> tuple[Path, Path]:
    from pconv.core.masks import MASK_SUFFIXES

    photos = tmp / "photos" / "all"  # one class folder, as ImageFolder wants
    photos.mkdir(parents=True)
    files = sorted((DATASETS / "cbsd68").glob("*.png")) + sorted((DATASETS / "celeba_hq_sample").glob("*.jpg"))
    if not files:
        sys.exit(f"no images under {DATASETS}; pass --images")
    for r in range(repeat):
        for f in files:
            os.link(f, photos / f"r{r}_{f.name}") if f.stat().st_dev == photos.stat().st_dev else \
                shutil.copy(f, photos / f"r{r}_{f.name}")
    masks = tmp / "masks.zip"
    with zipfile.ZipFile(DATASETS / "nvidia_irregular_mask_test.zip") as src, zipfile.ZipFile(masks, "w") as dst:
        names = sorted(n for n in src.namelist() if n.lower().endswith(MASK_SUFFIXES))
        for name in names[:: max(1, len(names) // n_masks)][:n_masks]:
            dst.writestr(name, src.read(name))
    return photos.parent, masks


# ---------------------------------------------------------------------------------------------------------------
class RayLoader:
    """The pipeline under test, as a lone training worker runs it: the rank's dataset of each epoch in turn."""

    def __init__(self, images: str, masks: str, args):
        import ray
        import torch

        from pconv.data import allocator, stream, transforms

        # this process consumes the batches as a training worker does: its allocator settings, and one torch
        # thread (Ray sets OMP_NUM_THREADS to a worker's CPU count: 1 per GPU worker by default)
        allocator.reuse_freed_memory()
        torch.set_num_threads(1)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.datasets = stream.WorkerDatasets(images, transforms.load_mask_bank(masks), args.image_size, None, seed=0,
                                              rank=0, world=1, num_cpus=args.task_cpus, concurrency=args.concurrency)
        self.batch_size, self.epoch = args.batch_size, 0
        self.float32 = args.batch_dtype == "float32"

    def __iter__(self):
        from pconv.data.inputs import to_float_batch

        ds = self.datasets.dataset(self.epoch)  # each pass: the next epoch (new order, crops and masks)
        self.epoch += 1
        batches = ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True)
        return (to_float_batch(b) for b in batches) if self.float32 else iter(batches)

    def close(self) -> None:
        import ray

        ray.shutdown()


def time_epoch(loader, account: CpuAccount | None = None) -> tuple[float, dict[str, float]]:
    """(images/s, CPU seconds per process group during the epoch, plus "images" and "wall")."""
    before = account.snapshot() if account else {}
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["image"])
    wall = time.perf_counter() - t0
    cpu = CpuAccount.delta(before, account.snapshot()) if account else {}
    return n / wall, {**cpu, "images": n, "wall": wall} if cpu else {}


def _rows(images: str, limit: int) -> list[bytes]:
    """A seeded random sample of the train split's encoded images: the same mix of sources as an epoch."""
    from pconv.storage import shards
    manifest = shards.read_manifest(images)
    blobs = shards.read_table(shards.shard_uris(images, manifest, "train"), ["image"]).column("image")
    pick = np.random.default_rng(0).permutation(len(blobs))[:limit]
    return [blobs[int(i)].as_py() for i in pick]


def _floor_rate(rows: list[bytes], bank, args) -> float:
    """Images/s of the pipeline's per-image work (the same transform, then the output format) in one thread."""
    import torch

    from pconv.data import stream, transforms
    from pconv.data.inputs import to_float_batch

    torch.set_num_threads(1)
    keys = np.array([f"k{i}" for i in range(len(rows))], dtype=object)
    blobs = np.array(rows, dtype=object)
    rands = np.random.default_rng(0).random(len(rows))
    bs = stream.rows_per_block(args.image_size)
    t0 = time.perf_counter()
    for i in range(0, len(rows), bs):
        out = transforms.train_transform({"key": keys[i:i + bs], "image": blobs[i:i + bs], "_rand": rands[i:i + bs]},
                                         image_size=args.image_size, base_seed=0, pairs=bank)
        if args.batch_dtype == "float32":
            to_float_batch({k: torch.from_numpy(out[k]) for k in ("image", "mask")})
    return len(rows) / (time.perf_counter() - t0)


def _crop_only_rate(rows: list[bytes], args) -> float:
    from pconv.core import images
    from pconv.data import transforms

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for blob in rows:
        transforms.random_crop_flip(images.open_image(blob, draft_size=args.image_size), args.image_size, rng)
    return len(rows) / (time.perf_counter() - t0)


def _floor_worker(rows, masks, args, barrier, results) -> None:
    from pconv.data import allocator, transforms

    allocator.reuse_freed_memory()  # as the pipeline's decode tasks do
    bank = transforms.load_mask_bank(masks)
    _floor_rate(rows[:8], bank, args)  # warm-up: imports, first allocations
    barrier.wait()  # all processes start timing together
    results.put((_floor_rate(rows, bank, args), _crop_only_rate(rows, args)))


def bench_floor(rows: list[bytes], masks: str, args, processes: int = 1) -> tuple[float, float]:
    """(same work as the pipeline, decode+crop only) images/s of the plain loop, summed over ``processes`` fresh
    processes running it at the same time. Fresh processes, like the loaders' workers: the driver's own state
    (the ingestion before, Ray's threads later) made in-process floors drift by 20 %."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_floor_worker, args=(rows, masks, args, barrier, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return float(sum(r[0] for r in rates)), float(sum(r[1] for r in rates))


class _MaskedFolder:
    """ImageFolder + a random augmented mask per image: the same work as the Ray pipeline, torch style."""

    def __init__(self, root: str, bank, size: int, float32: bool):
        from torchvision import datasets, transforms

        self.size, self.bank, self.float32 = size, bank, float32
        self.folder = datasets.ImageFolder(root, transform=transforms.Compose([
            transforms.Resize(size), transforms.RandomCrop(size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor() if float32 else transforms.PILToTensor()]))
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i):
        import torch

        image, _ = self.folder[i]
        mask = self.bank.train_mask(self.size, self.rng)  # the pipeline's pairing of a training crop
        return {"image": image, "mask": torch.from_numpy(mask[None].astype(np.float32 if self.float32 else np.uint8))}


def _worker_init(_):
    import torch

    from pconv.data import allocator

    allocator.reuse_freed_memory()  # the same allocator settings as the Ray pipeline's processes
    torch.set_num_threads(1)
    import numpy as _np

    info = torch.utils.data.get_worker_info()
    info.dataset.rng = _np.random.default_rng(info.seed % 2**32)


def make_dataloader(folder: str, masks: str, args):
    import torch

    from pconv.data import transforms

    ds = _MaskedFolder(folder, transforms.load_mask_bank(masks), args.image_size, args.batch_dtype == "float32")
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.cpus,
                                       worker_init_fn=_worker_init, persistent_workers=True, prefetch_factor=4)


def main() -> int:
    args = _args()
    sys.path.insert(0, str(REPO))
    from pconv import ingest
    from pconv.apps.local_s3 import LocalS3
    from pconv.core.masks import NVIDIA_HOLE_COLOR
    from pconv.storage import shards

    tmp = Path(tempfile.mkdtemp(prefix="pconv-bench-"))
    stack, s3 = contextlib.ExitStack(), None
    try:
        if args.images and args.masks:
            images, masks = args.images, args.masks
            folder = tmp / "photos"
            _export_images(images, folder / "all")
        else:
            s3 = stack.enter_context(LocalS3())
            stack.enter_context(s3.environment())  # this process and Ray's workers (started later) use it
            s3.create_bucket("bench")
            folder, mask_zip = _default_sources(tmp, args.repeat, args.n_masks)
            images, masks = "s3://bench/images", "s3://bench/masks"
            ingest.ingest_images(str(folder), images, val_fraction=0.0, shard_size_mb=32, engine="threads",
                                 progress=False)
            ingest.ingest_masks(str(mask_zip), masks, hole_color=NVIDIA_HOLE_COLOR, engine="threads", progress=False)
            print(f"moto S3 server {s3.endpoint}; images {shards.read_manifest(images)['counts']}, masks "
                  f"{shards.read_manifest(masks)['counts']}")
        n_files = sum(1 for _ in Path(folder).rglob("*.*"))
        print(f"cpus {args.cpus}, image size {args.image_size}, batch {args.batch_size} ({args.batch_dtype}), "
              f"{n_files} images, "
              f"ray task cpus {args.task_cpus}")
        rows = _rows(images, args.floor_images)
        floors = [bench_floor(rows, masks, args)]  # measured again after every epoch round: medians count
        print(f"floor (same work, 1 process): {floors[0][0]:.1f} images/s; decode+crop only: {floors[0][1]:.1f} "
              "images/s")
        parallel = bench_floor(rows, masks, args, processes=args.cpus)[0]
        print(f"floor in {args.cpus} processes at once: {parallel:.1f} images/s", flush=True)
        loaders = {"dataloader": make_dataloader(str(folder), masks, args), "raydata": RayLoader(images, masks, args)}
        for loader in loaders.values():  # warm-up epoch: worker start-up, imports, mask bank broadcast
            time_epoch(loader)
        account = CpuAccount(s3.process.pid if s3 is not None else None)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu_epochs: list[dict[str, float]] = []
        for epoch in range(args.epochs):  # interleaved, so both see the same background load
            for name, loader in loaders.items():
                rate, cpu = time_epoch(loader, account if name == "raydata" else None)
                rates[name].append(rate)
                print(f"  epoch {epoch} {name}: {rate:.1f} images/s", flush=True)
                if cpu:
                    cpu_epochs.append(cpu)
            floors.append(bench_floor(rows, masks, args))  # the same background load as this round's epochs
            print(f"  floor: {floors[-1][0]:.1f} images/s", flush=True)
        loaders["raydata"].close()
        parallel = max(parallel, bench_floor(rows, masks, args, processes=args.cpus)[0])
        full, crop_only = (float(np.median([f[i] for f in floors])) for i in (0, 1))
        dl, rd = float(np.median(rates["dataloader"])), float(np.median(rates["raydata"]))
        print(f"floor (median of {len(floors)}, measured between the epochs): {full:.1f} images/s "
              f"(range {min(f[0] for f in floors):.1f}-{max(f[0] for f in floors):.1f}); decode+crop only: "
              f"{crop_only:.1f} images/s")
        print(f"dataloader ({args.cpus} workers, median of {args.epochs} epochs): {dl:.1f} images/s")
        print(f"raydata ({args.cpus} cpus, S3 shards, median of {args.epochs} epochs): {rd:.1f} images/s")
        print(f"ratio raydata/dataloader: {rd / dl:.2f}")
        print(f"ratio raydata/decode_floor_per_cpu: {rd / (full * args.cpus):.2f}")
        print(f"ratio raydata/decode_crop_only_floor_per_cpu: {rd / (crop_only * args.cpus):.2f}")
        print(f"for reference: {args.cpus} floor processes at once reach {parallel:.1f} images/s "
              f"({parallel / full:.2f}x one: with nothing else running, plain loops alone get "
              f"{parallel / (full * args.cpus):.2f} of the per-CPU floor); ratio raydata/parallel_floor: "
              f"{rd / parallel:.2f}")
        _print_cpu_account(cpu_epochs, full, args.cpus)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _print_cpu_account(epochs: list[dict[str, float]], floor: float, cpus: int) -> None:
    """Where the machine's CPU time went during the Ray epochs (sums over the measured epochs), and the per-CPU
    ratio those shares allow at most: what the decode tasks could reach if they had every CPU second that the
    other processes (S3 server, driver, Ray services, other) did not use, with no idle time."""
    if not epochs:
        return
    total = {k: sum(e[k] for e in epochs) for k in epochs[0]}
    machine = sum(total[g] for g in CpuAccount.GROUPS)
    shares = ", ".join(f"{g} {100 * total[g] / machine:.0f} %" for g in CpuAccount.GROUPS)
    cores = os.cpu_count() or 1
    print(f"machine CPU time during the raydata epochs ({cores} cores, {machine:.1f} CPU-s): {shares}")
    per_image = 1000 * total["decode tasks"] / total["images"]
    cost = per_image * floor / 1000  # the decode tasks' CPU per image relative to the floor's
    print(f"decode tasks: {per_image:.2f} CPU-ms per image = {cost:.2f}x the floor's {1000 / floor:.2f} ms")
    others = sum(total[g] for g in ("S3 server", "driver", "Ray services", "other")) / machine
    ceiling = min(1.0, (1 - others) * cores / cpus)  # decode CPUs available, per CPU given to Ray
    print(f"ceiling of ratio raydata/decode_floor_per_cpu on this machine: {ceiling:.2f} (the other processes "
          f"took {100 * others:.0f} % of the {cores} cores; decode tasks with all the rest, no idle time and the "
          f"floor's CPU per image), {ceiling / cost:.2f} at their measured {cost:.2f}x")


def _export_images(images: str, out: Path) -> None:
    """Write the shards' images as files (for the ImageFolder baseline when --images is given)."""
    from pconv.storage import shards
    out.mkdir(parents=True)
    manifest = shards.read_manifest(images)
    table = shards.read_table(shards.shard_uris(images, manifest, "train"), ["key", "image", "format"])
    for i, (blob, fmt) in enumerate(zip(table.column("image").to_pylist(), table.column("format").to_pylist())):
        (out / f"{i:07d}.{'jpg' if fmt == 'jpeg' else fmt}").write_bytes(blob)


if __name__ == "__main__":
    sys.exit(main())
