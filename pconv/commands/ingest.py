#!/usr/bin/env python
"""Pack images or masks into Parquet shards + manifest.json (local folder or s3:// prefix) for training.

Examples:
  python pipelines/prepare_data.py images ~/places2/train s3://bucket/places2 --val-fraction 0.01
  python pipelines/prepare_data.py masks ../shared/datasets/nvidia_irregular_mask_test.zip s3://b/m --hole-color white
  python pipelines/prepare_data.py masks --generate 12000 s3://bucket/masks-gen --size 512 --seed 0
  python pipelines/prepare_data.py cleanup s3://bucket/places2   # delete shards the manifest no longer lists
  ray job submit --working-dir . -- python pipelines/prepare_data.py images s3://bucket/raw s3://bucket/places2

Engines: `--engine ray` (default): a Ray Data job, 1-CPU tasks on all nodes of the current cluster (RAY_ADDRESS, `ray
job submit`) or of a local Ray (local SRC/DST: seen by every node). `--engine threads`: this process, no Ray (tiny
inputs; the single-machine baseline of benchmarks/ingest_throughput.py).
S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
A re-run keeps the shards of the manifest it replaces (for readers still reading it) until the next run or
`cleanup`. Exit status: 0 on success (broken input files are skipped and listed in the manifest), 2 on a usage
error found before any work (missing SRC, unwritable DST, bad option, DST of the other kind) or on a refused run
(nothing usable, masks whose polarity looks inverted): DST is then left as it was.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pconv import ingest
from pconv.commands import common
from pconv.ingest import local


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--engine", choices=ingest.ENGINES, default="ray", help="see 'Engines' below (default ray)")
    shared = argparse.ArgumentParser(add_help=False)  # -q also accepted after the subcommand
    shared.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar, warnings only")
    shared.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    shared.add_argument("--allow-empty", action="store_true", help="write an empty dataset when no file is usable")
    shared.add_argument("--replace-kind", action="store_true", help="replace a DST holding the other kind")
    sub = parser.add_subparsers(dest="command", required=True)

    images = sub.add_parser("images", parents=[shared], formatter_class=common.HelpFormatter, help="photos (JPEG/PNG/WebP) -> image shards",
                            description="Decode every image once to validate it (EXIF orientation, any mode -> RGB) "
                                        "and store its original bytes in Parquet shards with a deterministic "
                                        "train/val split.")
    images.add_argument("src", metavar="SRC", help="folder (recursive), .zip file, or s3:// prefix of images")
    images.add_argument("dst", metavar="DST", help="output folder or s3:// prefix (manifest.json + train/ + val/)")
    images.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of images (by stable hash of their path) put in the val split (default 0.01)")
    images.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale (and re-encode) images whose longer side exceeds N pixels; default: keep all")

    masks = sub.add_parser("masks", parents=[shared], formatter_class=common.HelpFormatter,
                           help="mask archive/folder/prefix, or generated masks -> mask shards",
                           usage="%(prog)s SRC DST [--hole-color white|black] [--threshold T] [options]\n"
                                 "       %(prog)s --generate N DST [--size 512] [--seed S] [options]",
                           description="Store binary masks (1-bit PNG, white = valid) with hole ratio, paper bin "
                                       "and border flag. Give SRC and DST (white = hole unless --hole-color black), or "
                                       "--generate N and DST. A set that looks inverted is refused unless --force.")
    masks.add_argument("paths", nargs="+", metavar="PATH",
                       help="SRC (folder, .zip, or s3:// prefix) and DST; only DST with --generate")
    common.add_hole_color(masks)
    masks.add_argument("--threshold", type=float, default=0.5,
                       help="grey level (0-1] at or above which a pixel counts as white (default 0.5; use 0.6 for "
                            "NVIDIA's soft training masks)")
    masks.add_argument("--val-fraction", type=float, default=0.0, help="fraction of masks in the val split (default 0)")
    masks.add_argument("--generate", type=int, metavar="N", help="generate N masks instead of reading SRC")
    masks.add_argument("--size", type=int, default=512, help="generated mask size in pixels (default 512)")
    masks.add_argument("--seed", type=int, default=0, help="seed of the generated set (default 0)")
    masks.add_argument("--force", action="store_true", help="ingest even when most masks are > 60%% holes (inverted?)")
    sub.add_parser("cleanup", help="delete the shards under DST that its manifest does not list").add_argument("dst")
    return parser


def _ingest(args: argparse.Namespace, progress: bool) -> str:
    if args.command == "cleanup":
        return f"cleanup: removed {len(local.cleanup(args.dst))} shard(s) not listed in the manifest of {args.dst}"
    options = {k: getattr(args, k) for k in ("val_fraction", "shard_size_mb", "replace_kind", "engine")}
    options["progress"] = progress
    if args.command == "images":
        return ingest.ingest_images(args.src, args.dst, max_side=args.max_side, allow_empty=args.allow_empty,
                                    **options).line()
    if args.generate is not None:
        return ingest.generate_masks(args.generate, args.paths[0], size=args.size, seed=args.seed, **options).line()
    return ingest.ingest_masks(args.paths[0], args.paths[1], hole_color=args.hole_color, threshold=args.threshold,
                               allow_empty=args.allow_empty, force=args.force, **options).line()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "masks" and len(args.paths) != (1 if args.generate is not None else 2):
        parser.error("masks takes SRC and DST, or --generate N and only DST")
    common.setup_logging(logging.WARNING if args.quiet else logging.INFO)
    return common.run(lambda: print(_ingest(args, progress=not args.quiet)), prog="prepare_data: error",
                      expected=(local.IngestError,))


if __name__ == "__main__":
    sys.exit(main())
