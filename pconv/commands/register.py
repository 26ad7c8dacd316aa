#!/usr/bin/env python
"""Register a checkpoint's model in the MLflow registry (PyTorch flavour, pickle-free) with an alias.

Example:
  python pipelines/register.py --checkpoint s3://bucket/runs/places2/checkpoint_000042 --alias candidate

The model is logged into the training run recorded in the checkpoint (meta.json), or --run-id, or the run
named after the checkpoint's run_name in --experiment. The new version gets --alias (default: candidate);
`champion` moves only through `pipelines/evaluate.py --promote champion`. MLFLOW_TRACKING_URI selects the server.
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common
from pconv.tracking.registry import CANDIDATE, CHAMPION, INPAINTING_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder or s3:// prefix (state.pt + config.yaml + meta.json), or a folder of "
                             "checkpoints (the latest is used)")
    parser.add_argument("--name", default=INPAINTING_MODEL, help=f"registered model name (default {INPAINTING_MODEL})")
    parser.add_argument("--alias", default=CANDIDATE,
                        help=f"alias for the new version (default {CANDIDATE}; {CHAMPION} moves only through "
                             "evaluation)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the checkpoint's config)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run (default: the checkpoint's run)")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        from pconv.tracking.registry import register_checkpoint

        version = register_checkpoint(args.checkpoint, name=args.name, alias=args.alias,
                                      experiment=args.experiment, run_id=args.run_id)
        print(f"registered {args.name} version {version} with alias {args.alias!r}: "
              f"models:/{args.name}@{args.alias}")
        return 0

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
