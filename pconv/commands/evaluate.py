#!/usr/bin/env python
"""Evaluate a model with the paper's protocol (Liu et al., ECCV 2018, Table 1) and optionally promote it.

L1 (%), PSNR and SSIM of the composite per hole-ratio bin, with and without holes near the border, on fixed
(image, mask) pairs; the same table for a non-learned baseline; both logged to MLflow (table + bar chart).
A super-resolution model (task: sr) is evaluated instead against bicubic upsampling (pconv.evaluation.sr: PSNR /
SSIM on Y, the headline, and on RGB); it needs no --masks, and --scale must match the model's.

Examples:
  python pipelines/evaluate.py --model models:/pconv-unet@candidate \\
      --images s3://bucket/places2-val --masks s3://bucket/nvidia-test-masks --limit 200 --promote champion
  # raw mask files instead of mask shards need their polarity:
  python pipelines/evaluate.py --model runs/demo --images ../shared/datasets/cbsd68 \\
      --masks ../shared/datasets/nvidia_irregular_mask_test.zip --hole-color white --image-size 256

--images: image shards (manifest.json) or a folder / zip / s3:// prefix of image files.
--masks: mask shards (with their bin/border columns) or raw mask files with --hole-color.
--promote ALIAS moves ALIAS to this model only when its mean PSNR over the same pairs is strictly higher than
that of the version holding ALIAS (no holder: it moves); ties and regressions leave the alias and say why.
Unreadable images or masks are skipped and listed; the evaluation still runs and then exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from pconv.commands import common
from pconv.evaluation.inpainting import DEFAULT_IMAGE_SIZE, EVAL_EXPERIMENT, run_evaluation
from pconv.tracking.registry import CHAMPION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    parser.add_argument("--images", required=True, help="evaluation images: shard root or folder/zip/s3:// of files")
    parser.add_argument("--masks",
                        help="inpainting: test masks, mask shard root or folder/zip of files (+ --hole-color)")
    parser.add_argument("--scale", type=int, default=None, help="super-resolution models: K (default: the model's)")
    common.add_hole_color(parser)  # only raw mask files need it; mask shards store their polarity
    parser.add_argument("--limit", type=int, default=None,
                        help="use at most N images (each is paired with every group)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="evaluation size in px (paper: 512)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="image/mask pairs scored per forward pass; the scores do not depend on it")
    common.add_device(parser)
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-learned baseline")
    parser.add_argument("--experiment", default=EVAL_EXPERIMENT, help="MLflow experiment for the evaluation run")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation to MLflow")
    parser.add_argument("--promote", metavar="ALIAS", default=None,
                        help=f"move ALIAS (e.g. {CHAMPION}) to this registered version if it beats the current holder")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    return common.run(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from pconv.core.config import SR_TASK
    from pconv.tracking.loading import model_config

    if model_config(args.model).get("task") == SR_TASK:  # the model's task decides (config.yaml only, no weights)
        from pconv.evaluation.sr import run_sr_evaluation

        result = run_sr_evaluation(args.model, args.images, args.scale, image_size=args.image_size,
                                   limit=args.limit, batch_size=args.batch_size, device=args.device,
                                   baseline=not args.no_baseline, promote_alias=args.promote,
                                   experiment=None if args.no_mlflow else args.experiment)
        return _report(args, result)
    if not args.masks:
        raise ValueError(f"{args.model} is an inpainting model: --masks (the test masks) is required")
    result = run_evaluation(args.model, args.images, args.masks, image_size=args.image_size, limit=args.limit,
                            hole_color=args.hole_color, batch_size=args.batch_size, device=args.device,
                            baseline=not args.no_baseline, experiment=None if args.no_mlflow else args.experiment,
                            promote_alias=args.promote)
    return _report(args, result)


def _report(args: argparse.Namespace, result: dict) -> int:
    print(result["markdown"])
    if result.get("mlflow_run_id"):
        print(f"logged to MLflow run {result['mlflow_run_id']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v for k, v in result.items() if k != "markdown"}, fh, indent=2, default=str)
    for reason in result.get("skipped") or []:
        print(f"skipped {reason}", file=sys.stderr)
    if result.get("skipped"):
        print(f"{len(result['skipped'])} unreadable file(s) skipped", file=sys.stderr)
    return 1 if result.get("skipped") else 0


if __name__ == "__main__":
    sys.exit(main())
