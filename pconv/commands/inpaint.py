#!/usr/bin/env python
"""Inpaint images with a trained PConv U-Net: valid pixels are kept exactly, holes are filled.

Examples:
  python pipelines/inpaint.py --model models:/pconv-unet@champion \\
      --image photo.jpg --mask holes.png --hole-color white --out filled.png
  # folders: images and masks are paired by file name without suffix (a/b.jpg <-> a/b.png)
  python pipelines/inpaint.py --model s3://bucket/runs/places2/checkpoint_000042 \\
      --image in/ --mask masks/ --hole-color black --out s3://bucket/filled/

--model takes models:/NAME@ALIAS or models:/NAME/VERSION (MLflow registry, MLFLOW_TRACKING_URI), a checkpoint
folder or s3:// prefix (state.pt + config.yaml + meta.json), or a local MLflow model folder. Any image size
works: the image is padded to the network's multiple and cropped back, or tiled when larger than --max-side.
Output is lossless (.png, .webp, .tif, .bmp); .jpg only with --allow-lossy. A folder's unreadable pairs are
skipped and listed (exit 1); refused input exits 2. A mask that is mostly holes gets a polarity warning.
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    parser.add_argument("--image", required=True, help="image file or folder (local or s3://)")
    parser.add_argument("--mask", required=True, help="mask file or folder, same size as its image")
    parser.add_argument("--out", required=True, help="output file (.png/.webp/.tif/.bmp: lossless), or folder when "
                                                     "--image is a folder (PNG)")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="allow a lossy --out (.jpg): valid pixels are then NOT kept exactly")
    common.add_hole_color(parser)
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="grey level (0-1] at or above which a mask pixel counts as white (default 0.5)")
    common.add_device(parser)
    parser.add_argument("--max-side", type=int, default=2048, help="tile images whose longer side exceeds this (px)")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        from pconv.inference.inpaint import inpaint_files

        rows = inpaint_files(args.model, args.image, args.mask, args.out, args.hole_color, args.threshold,
                             device=args.device, max_side=args.max_side, allow_lossy=args.allow_lossy)
        skipped = [row for row in rows if row.get("error")]
        for row in rows:
            if row.get("error"):
                print(f"skipped {row['image']}: {row['error']}", file=sys.stderr)
                continue
            print(f"{row['image']} + {row['mask']} -> {row['out']} ({row['width']}x{row['height']}, "
                  f"{100 * row['hole_ratio']:.1f}% holes)")
            if row.get("warning"):
                print(f"warning: {row['mask']} with --hole-color {args.hole_color}: {row['warning']}", file=sys.stderr)
        if skipped:
            print(f"{len(rows) - len(skipped)} of {len(rows)} written, {len(skipped)} skipped", file=sys.stderr)
        return 1 if skipped else 0

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
