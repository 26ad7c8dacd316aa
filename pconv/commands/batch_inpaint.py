#!/usr/bin/env python
"""Offline inpainting at scale with Ray Data (map_batches + an autoscaling actor pool; GPU actors when the cluster
has GPUs or can launch GPU nodes).

Example:
  ray job submit --working-dir . -- python pipelines/batch_inpaint.py \\
      --model models:/pconv-unet@champion --images s3://bucket/in/ --masks s3://bucket/masks/ \\
      --hole-color white --out s3://bucket/filled/

Images and masks are paired by relative path without suffix; results are PNGs under --out with the same
relative names. Unreadable pairs are skipped and listed (exit code 1 if any were skipped).
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    parser.add_argument("--images", required=True, help="folder or s3:// prefix of images")
    parser.add_argument("--masks", required=True, help="folder or s3:// prefix of masks (same names as the images)")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    common.add_hole_color(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="grey level (0-1] counted as white (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="most actors; the pool starts with one and grows as nodes join (default: the GPUs, or "
                             "half the CPUs without GPUs, that the cluster has or its autoscaler can launch)")
    parser.add_argument("--cpu", action="store_true", help="use CPU actors even if the cluster has GPUs")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        from pconv.inference.batch import batch_inpaint

        summary = batch_inpaint(args.model, args.images, args.masks, args.out, args.hole_color, args.threshold,
                                batch_size=args.batch_size, num_actors=args.num_actors,
                                use_gpu=False if args.cpu else None)
        print(f"{summary['written']} of {summary['total']} written to {summary['out']} "
              f"(up to {summary['num_actors']} {'GPU' if summary['use_gpu'] else 'CPU'} actors)")
        for image, reason in summary["errors"]:
            print(f"skipped {image}: {reason}", file=sys.stderr)
        if summary.get("polarity_warning"):
            print(f"warning: masks with --hole-color {args.hole_color}: {summary['polarity_warning']}",
                  file=sys.stderr)
        return 1 if summary["skipped"] else 0

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
