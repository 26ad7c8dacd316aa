#!/usr/bin/env python
"""Train a PConv U-Net (Liu et al., ECCV 2018) on a Ray cluster: both phases, checkpoints, MLflow, registry.

Examples:
  # on a cluster (RAY_ADDRESS / `ray job submit` picks it up), data and checkpoints in S3:
  ray job submit --working-dir . -- python pipelines/train.py \\
      --images s3://bucket/places2 --masks s3://bucket/masks --storage s3://bucket/runs \\
      --run-name places2-512 --workers 8 --vgg-weights s3://bucket/weights/vgg16.pth
  # locally, embedded defaults (local Ray, local folders, sqlite MLflow store):
  python pipelines/train.py --config configs/demo.yaml
  # super-resolution x4 (paper Sec. 5) on the same image shards, no masks; registers pconv-sr:
  python pipelines/train.py --task sr --sr-scale 4 --images s3://bucket/places2 --image-size 256 --run-name sr4

Re-running the same command (same --run-name and --storage) resumes from the latest checkpoint;
re-running a finished run does nothing and says so. Every flag is a key of pconv.core.config.TrainConfig, described
once in its field metadata (the README's configuration table is generated from the same text).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from pconv.commands import common
from pconv.core.config import ConfigError, TrainConfig, default_text, merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--config", help="YAML file with the same keys as these flags; flags override it")
    common.add_log_level(parser)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {default_text(f)})".replace("`", "").replace("%", "%%")
        kind = str(f.type)
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            if f.metadata.get("range_of"):  # N or MIN-MAX: TrainConfig.from_dict splits it
                conv = str
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=help_text, choices=choices,
                                metavar=None if choices else f.name.upper())
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    common.setup_logging(args.pop("log_level"))
    config_file = args.pop("config", None)

    def train() -> None:
        from pconv.train.driver import run

        base = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        print(run(merge(base, args).validate()).describe())

    return common.run(train, expected=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
