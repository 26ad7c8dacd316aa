#!/usr/bin/env python
"""Super-resolve an image with a PConv U-Net trained for super-resolution (task: sr; Liu et al., ECCV 2018, Sec. 5).

Examples:
  python pipelines/super_resolve.py --model models:/pconv-sr@champion --image small.png --out large.png
  python pipelines/super_resolve.py --model runs/sr-x4 --image s3://bucket/lr/a.png --scale 4 --out a_x4.png

The output is --scale (K) times larger; the LR pixels appear unchanged at their grid positions (the paper's
offset floor(K/2) inside each K x K block) and the net fills everything else. --scale defaults to the model's
sr_scale; a different --scale is refused (the grid spacing is fixed by training). Any input size works (padding,
and tiles when the output's longer side exceeds --max-side). An output above Pillow's pixel limit (the same limit as
for inpainting inputs) is refused. An inpainting model is refused: use pipelines/inpaint.py for it.
Output is lossless (.png, .webp, .tif, .bmp); .jpg only with --allow-lossy. Refused input exits 2.
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    parser.add_argument("--image", required=True, help="the low-resolution image file (local or s3://)")
    parser.add_argument("--out", required=True, help="output file (.png/.webp/.tif/.bmp: lossless; local or s3://)")
    parser.add_argument("--scale", type=int, default=None, help="upscaling factor K (2 or 4); default: the model's")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="allow a lossy --out (.jpg): the LR pixels are then NOT kept exactly")
    common.add_device(parser)
    parser.add_argument("--max-side", type=int, default=2048, help="tile outputs whose longer side exceeds this (px)")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        from pconv.inference.super_resolve import super_resolve_file

        row = super_resolve_file(args.model, args.image, args.out, scale=args.scale, device=args.device,
                                 max_side=args.max_side, allow_lossy=args.allow_lossy)
        print(f"{row['image']} ({row['width']}x{row['height']}) -> {row['out']} "
              f"({row['out_width']}x{row['out_height']}, x{row['scale']})")
        return 0

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
