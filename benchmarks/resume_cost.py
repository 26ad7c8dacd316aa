#!/usr/bin/env python
"""Cost of an exact resume: time from resume to the first training batch, at the start vs the end of an epoch.

A resume at data position p (pconv.data.plan) does not read the read units wholly before p and does not decode
the rows before p in the unit holding it, so resuming at the end of an epoch should cost about what resuming at its
start costs. This script packs CBSD68 + the CelebA-HQ sample from ../shared/datasets, repeated --repeat times under
distinct keys, into local shards (small row groups, so the epoch has many read units), starts a local Ray with
--cpus CPUs, and times, --trials times each, building rank 0's stream at position 0 and at the epoch's last full
batch and taking its first batch. Medians are printed, and the ratio:

  ratio resume_end/resume_start: X      (about 1 means skipping is free; a replay would scale with the position)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_dataset(tmp: Path, repeat: int) -> tuple[str, str]:
    import zipfile

    from pconv import ingest
    shared = REPO.parent / "shared" / "datasets"
    photos = tmp / "photos"
    sources = sorted((shared / "cbsd68").glob("*.png")) + sorted((shared / "celeba_hq_sample").glob("*.jpg"))
    for r in range(repeat):
        (photos / f"r{r:03d}").mkdir(parents=True)
        for p in sources:
            (photos / f"r{r:03d}" / p.name).write_bytes(p.read_bytes())
    masks = tmp / "masks.zip"
    with zipfile.ZipFile(shared / "nvidia_irregular_mask_test.zip") as src, zipfile.ZipFile(masks, "w") as dst:
        for name in sorted(n for n in src.namelist() if n.endswith(".png"))[::100]:
            dst.writestr(name, src.read(name))
    images_uri, masks_uri = str(tmp / "shards" / "images"), str(tmp / "shards" / "masks")
    ingest.ingest_images(str(photos), images_uri, val_fraction=0.0, shard_size_mb=2.0, engine="threads", progress=False)
    ingest.ingest_masks(str(masks), masks_uri, hole_color="white", engine="threads", progress=False)
    return images_uri, masks_uri


def _first_batch_seconds(datasets, batch: int, start: int) -> float:
    """Seconds from building the rank's dataset of epoch 0 at row ``start`` (pconv.data.stream.WorkerDatasets, as
    a resumed worker does) to its first batch."""
    t0 = time.perf_counter()
    ds = datasets.dataset(0, start=start)
    it = iter(ds.iter_torch_batches(batch_size=batch, drop_last=True))
    first = next(it)
    elapsed = time.perf_counter() - t0
    assert int(first["pos"][0]) >= start
    it.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="copies of the shared photos (default 20)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from pconv.data import stream, transforms

    with tempfile.TemporaryDirectory(prefix="pconv-resume-bench-") as tmp:
        images_uri, masks_uri = _make_dataset(Path(tmp), args.repeat)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        units = stream.read_units(images_uri, "train")
        rows = sum(u["rows"] for u in units)
        end = (rows // args.batch - 1) * args.batch  # the epoch's last full batch
        datasets = stream.WorkerDatasets(images_uri, transforms.load_mask_bank(masks_uri), args.image_size, units,
                                         seed=0, rank=0, world=1)
        _first_batch_seconds(datasets, args.batch, 0)  # warm-up
        times = {"start": [], "end": []}
        for _ in range(args.trials):  # interleaved, so drift in machine speed hits both alike
            times["start"].append(_first_batch_seconds(datasets, args.batch, 0))
            times["end"].append(_first_batch_seconds(datasets, args.batch, end))
        ray.shutdown()
    start_s, end_s = statistics.median(times["start"]), statistics.median(times["end"])
    print(f"epoch: {rows} images in {len(units)} read units; resume at row 0 and at row {end}")
    print(f"resume_start first batch: {start_s:.2f} s (median of {args.trials})")
    print(f"resume_end   first batch: {end_s:.2f} s (median of {args.trials})")
    print(f"ratio resume_end/resume_start: {end_s / start_s:.2f}")


if __name__ == "__main__":
    main()
