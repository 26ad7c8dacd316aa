#!/usr/bin/env python
"""Ingest throughput: the Ray engine (pconv.ingest, engine="ray") vs the thread engine vs the decode floor.

Measured on the SAME files (CBSD68 + the CelebA-HQ sample from ../shared/datasets, copied --copies times under
distinct folders, i.e. 124 x copies real photos) into a local folder, with the same CPUs:

  ray       pconv.ingest.ingest_images(engine="ray") on a local Ray started with --cpus CPUs (one task of 1 CPU per
            chunk); timed on a warm Ray (worker processes started by a first, untimed run, whose time is
            printed as "cold"). Ray's start-up is printed apart: it is paid once per job, not per image.
  threads   pconv.ingest.ingest_images(engine="threads"): one process, a thread pool, no Ray; pinned to --cpus
            cores (sched_setaffinity) when --cpus is below the machine's core count.
  floor     a plain loop over the same encoded bytes in memory doing the per-file work of both engines
            (pconv.ingest.rows.process_image: full decode + validation, and the --max-side re-encode if given),
            one process: images/s per CPU. "floor x cpus" is the ideal no engine can beat.

Rounds alternate ray and threads (medians reported), so the background load of a shared machine hits both alike.
Printed ratios (issue 17's target: ray/threads >= 1.0 at 2 CPUs):
  ratio ray/threads: X
  ratio ray/decode_floor: Y        (ray images/s / (floor images/s x cpus))
  ratio threads/decode_floor: Z
plus the per-CPU rate of the Ray engine and, on Linux, where the machine's CPU time went during the Ray runs
(benchmarks/cpu_account.py): decode tasks, driver, Ray's services. Last, the model of docs/scaling.md section 7:
time and cost of ingesting Places2 on K cpu.m5.8xlarge nodes from that per-CPU rate (``--model-only --per-cpu R``
prints it for a given rate without measuring).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cpu_account import CpuAccount  # benchmarks/cpu_account.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


# Places2 (Places365-Standard) training set: 1,803,460 images, ~105 GB as published (high-resolution JPEGs).
PLACES2_IMAGES, PLACES2_BYTES = 1_803_460, 105e9
# ray_cluster.yaml's data node type, cpu.m5.8xlarge: 32 vCPU, "up to 10 Gbit/s", $1.536/h on demand (us-east-1).
NODE_VCPUS, NODE_GBIT, NODE_PRICE_H = 32, 10.0, 1.536
LAUNCH_S = 300     # autoscaler: instance boot + image pull + `ray start` of a CPU node (~5 min; 0 if already up)
IDLE_S = 600       # ray_cluster.yaml idle_timeout_minutes: a node is billed this long after its last task
LIST_PAGE_S = 0.05  # one S3 LIST page (1,000 keys) in region, listed serially by the driver
GET_PRICE = 0.0004 / 1000  # $ per S3 GET (us-east-1 standard); LIST/PUT counts are negligible (1,800 / ~450)


def ingest_model(per_cpu: float, nodes: int, images: int = PLACES2_IMAGES, total_bytes: float = PLACES2_BYTES,
                 launch_s: float = LAUNCH_S) -> dict[str, float]:
    """Seconds and dollars to ingest ``images`` on ``nodes`` data nodes at ``per_cpu`` images/s per vCPU: each node
    is bound by its vCPUs or by its NIC (every image crosses it twice: the GET and its share of a shard PUT). The
    driver lists first (on the head), then the queued tasks make the autoscaler launch the nodes; they are billed
    from launch to the end of the idle timeout."""
    cpu_rate = nodes * NODE_VCPUS * per_cpu
    net_rate = nodes * NODE_GBIT * 1e9 / 8 / (2 * total_bytes / images)
    rate = min(cpu_rate, net_rate)
    work_s, list_s = images / rate, images / 1000 * LIST_PAGE_S
    return {"rate": rate, "bound": "cpu" if cpu_rate <= net_rate else "network", "list_s": list_s,
            "work_s": work_s, "total_s": launch_s + list_s + work_s,
            "dollars": nodes * NODE_PRICE_H * (launch_s + work_s + IDLE_S) / 3600 + images * GET_PRICE}


def print_model(per_cpu: float) -> None:
    print(f"Places2 model ({PLACES2_IMAGES:,} images, {PLACES2_BYTES / 1e9:.0f} GB) at {per_cpu:.0f} images/s per "
          f"vCPU on cpu.m5.8xlarge ({NODE_VCPUS} vCPU, {NODE_GBIT:g} Gbit/s, ${NODE_PRICE_H}/h), node launch "
          f"{LAUNCH_S / 60:.0f} min, listing {PLACES2_IMAGES / 1000 * LIST_PAGE_S / 60:.1f} min, idle timeout "
          f"{IDLE_S / 60:.0f} min billed:")
    for k in (1, 2, 4, 8):
        m = ingest_model(per_cpu, k)
        print(f"  K={k}: {m['rate']:,.0f} images/s ({m['bound']}-bound), decode+write {m['work_s'] / 60:.1f} min, "
              f"end to end {m['total_s'] / 60:.1f} min, ${m['dollars']:.2f}")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both engines (default: all)")
    p.add_argument("--copies", type=int, default=4, help="copies of the 124 shared photos (default 4: 496 files)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each engine, alternated (default 3)")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="as prepare_data.py (default 256)")
    p.add_argument("--max-side", type=int, default=None, help="as prepare_data.py images --max-side")
    p.add_argument("--floor-images", type=int, default=248, help="images in the floor loop (default 248)")
    p.add_argument("--model-only", action="store_true", help="print the Places2 model only (needs --per-cpu)")
    p.add_argument("--per-cpu", type=float, help="images/s per vCPU for --model-only")
    return p.parse_args(argv)


def stage_photos(root: Path, copies: int) -> int:
    """``copies`` x (CBSD68 + CelebA-HQ sample) under root/copy<i>/<folder>/; returns the number of photos."""
    n = 0
    for i in range(copies):
        for folder, suffix in (("cbsd68", ".png"), ("celeba_hq_sample", ".jpg")):
            dst = root / f"copy{i}" / folder
            dst.mkdir(parents=True)
            for p in sorted((DATASETS / folder).glob(f"*{suffix}")):
                shutil.copyfile(p, dst / p.name)
                n += 1
    return n


def floor_rate(root: Path, limit: int, max_side: int | None) -> float:
    """Images/s of the per-file work alone, one process, bytes already in memory."""
    from pconv.ingest.rows import process_image

    files = sorted(p for p in root.rglob("*") if p.is_file())[:limit]
    blobs = [(p.name, p.read_bytes()) for p in files]
    t0 = time.perf_counter()
    for key, data in blobs:
        process_image(key, data, 0.01, max_side)
    return len(blobs) / (time.perf_counter() - t0)


def timed(fn, dst: Path) -> tuple[float, int]:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    summary = fn(dst)
    return time.perf_counter() - t0, summary.ingested


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.model_only:
        print_model(args.per_cpu or 200.0)
        return 0
    import ray

    from pconv import cluster, ingest

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="pconv-ingest-bench-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        n = stage_photos(src, args.copies)
        options = {"val_fraction": 0.01, "shard_size_mb": args.shard_size_mb, "max_side": args.max_side,
                   "progress": False}
        print(f"{n} photos ({sum(p.stat().st_size for p in src.rglob('*') if p.is_file()) / 2**20:.0f} MB) in "
              f"{args.copies} copies of CBSD68 + CelebA-HQ sample; cpus {args.cpus} of {cores} cores", flush=True)

        t0 = time.perf_counter()
        cluster.connect(local_cpus=args.cpus, quiet=True)
        print(f"Ray start-up: {time.perf_counter() - t0:.1f} s (once per job)", flush=True)
        cold, _ = timed(lambda d: ingest.ingest_images(str(src), str(d), engine="ray", **options), out)
        print(f"ray cold run (starts the worker processes): {n / cold:.1f} images/s", flush=True)

        def threads(d: Path):
            mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            if mask is not None and args.cpus < len(mask):
                os.sched_setaffinity(0, sorted(mask)[:args.cpus])
            try:
                return ingest.ingest_images(str(src), str(d), engine="threads", **options)
            finally:
                if mask is not None:
                    os.sched_setaffinity(0, mask)

        account = CpuAccount(s3_pid=None)
        rates: dict[str, list[float]] = {"ray": [], "threads": []}
        cpu: dict[str, float] = {}
        floors = []
        for r in range(args.rounds):
            before = account.snapshot()
            seconds, ingested = timed(lambda d: ingest.ingest_images(str(src), str(d), engine="ray", **options), out)
            for k, v in CpuAccount.delta(before, account.snapshot()).items():
                cpu[k] = cpu.get(k, 0.0) + v
            assert ingested == n, (ingested, n)
            rates["ray"].append(n / seconds)
            seconds, ingested = timed(threads, out)
            rates["threads"].append(n / seconds)
            floors.append(floor_rate(src, args.floor_images, args.max_side))
            print(f"  round {r}: ray {rates['ray'][-1]:.1f}, threads {rates['threads'][-1]:.1f}, "
                  f"floor {floors[-1]:.1f} images/s", flush=True)
        ray.shutdown()

    rayr, thr, floor = (statistics.median(rates["ray"]), statistics.median(rates["threads"]),
                        statistics.median(floors))
    print(f"floor (per-image work, 1 process, median): {floor:.1f} images/s = {1000 / floor:.2f} ms per image")
    print(f"threads ({args.cpus} cpus, median of {args.rounds}): {thr:.1f} images/s")
    print(f"ray ({args.cpus} cpus, warm, median of {args.rounds}): {rayr:.1f} images/s "
          f"= {rayr / args.cpus:.1f} images/s per CPU")
    print(f"ratio ray/threads: {rayr / thr:.2f}")
    print(f"ratio ray/decode_floor: {rayr / (floor * args.cpus):.2f}")
    print(f"ratio threads/decode_floor: {thr / (floor * args.cpus):.2f}")
    total = sum(cpu.get(g, 0.0) for g in CpuAccount.GROUPS)
    if total > 0:
        shares = ", ".join(f"{g} {100 * cpu.get(g, 0.0) / total:.0f} %" for g in CpuAccount.GROUPS if g != "S3 server")
        print(f"machine CPU time during the ray runs ({cores} cores, {total:.1f} CPU-s): {shares}")
    print_model(rayr / args.cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
