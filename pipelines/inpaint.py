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
"""

from __future__ import annotations

import argparse
import sys

from pconv import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    p.add_argument("--image", required=True, help="image file or folder (local or s3://)")
    p.add_argument("--mask", required=True, help="mask file or folder, same size as its image")
    p.add_argument("--out", required=True, help="output file, or folder when --image is a folder (PNG)")
    p.add_argument("--hole-color", required=True, choices=("white", "black"),
                   help="which colour marks HOLES in the mask files (NVIDIA's test masks: white). Required: "
                        "a wrong guess would inpaint the wrong pixels")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="grey level (0-1] at or above which a mask pixel counts as white (default 0.5)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--max-side", type=int, default=2048, help="tile images whose longer side exceeds this (px)")
    cli.add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    from pconv.inference import inpaint_files

    try:
        rows = inpaint_files(args.model, args.image, args.mask, args.out, args.hole_color, args.threshold,
                             device=args.device, max_side=args.max_side)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"{row['image']} + {row['mask']} -> {row['out']} ({row['width']}x{row['height']}, "
              f"{100 * row['hole_ratio']:.1f}% holes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
