#!/usr/bin/env python
"""Train a PConv U-Net (Liu et al., ECCV 2018) on a Ray cluster: both phases, checkpoints, MLflow, registry.

Examples:
  # on a cluster (RAY_ADDRESS / `ray job submit` picks it up), data and checkpoints in S3:
  ray job submit --working-dir . -- python pipelines/train.py \\
      --images s3://bucket/places2 --masks s3://bucket/masks --storage s3://bucket/runs \\
      --run-name places2-512 --workers 8 --vgg-weights s3://bucket/weights/vgg16.pth
  # locally, embedded defaults (local Ray, local folders, sqlite MLflow store):
  python pipelines/train.py --config configs/demo.yaml

Re-running the same command (same --run-name and --storage) resumes from the latest checkpoint;
re-running a finished run does nothing and says so.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from pconv import cli
from pconv.config import ConfigError, TrainConfig, merge

HELP = {
    "images": "URI of image shards (folder or s3:// prefix with manifest.json), made by prepare_data.py images",
    "masks": "URI of mask shards, made by prepare_data.py masks",
    "image_size": "training crop size in pixels (paper: 512)",
    "val_size": "number of fixed validation (image, mask) pairs for val metrics and sample grids",
    "run_name": "name of this training run; with --storage it identifies the run for resume",
    "storage": "where checkpoints go: a local folder or s3:// prefix",
    "experiment": "MLflow experiment name",
    "register_as": "registered model name for the final model ('' to skip registration)",
    "workers": "number of data-parallel training workers (one GPU each when GPUs are used)",
    "use_gpu": "train on GPUs (default: if the cluster has GPUs)",
    "cpus_per_worker": "CPUs reserved per worker (default: 1 with GPUs, 0.5 on CPU-only clusters)",
    "max_failures": "worker-group restarts Ray Train may do before the run fails",
    "layer_size": "U-Net depth (default: what the image size allows: 8 at 512, 7 at 256)",
    "init_from": "start from these weights: checkpoint URI, local path or models:/NAME@ALIAS",
    "batch_size": "GLOBAL batch size, split evenly across workers (default: 6 per worker, the paper's)",
    "phase1_steps": "steps of phase 1 (BN on, --lr); 0 with --init-from fine-tunes only",
    "phase2_steps": "steps of phase 2 (encoder BN frozen, --finetune-lr)",
    "lr": "Adam learning rate of phase 1 (paper: 2e-4)",
    "finetune_lr": "Adam learning rate of phase 2 (paper: 5e-5)",
    "vgg_weights": "VGG16 for the perceptual/style losses: imagenet | random (tests only) | path or URI of a state dict",
    "amp": "mixed precision: auto (bf16 where supported, fp16 on V100, off on CPU) | fp16 | bf16 | off",
    "max_nan_steps": "consecutive non-finite losses tolerated (steps skipped) before the run stops",
    "seed": "seed for model init and data order",
    "log_every": "log training metrics every N steps",
    "checkpoint_every": "checkpoint every N steps (and at the end)",
    "num_to_keep": "checkpoints kept in storage",
    "val_every": "validate on the fixed pairs every N steps",
    "sample_every": "log a sample grid (masked | mask | output | composite | truth) every N steps",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the same keys as these flags; flags override it")
    cli.add_log_level(parser)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{HELP.get(f.name, '')} (default: {getattr(defaults, f.name)})"
        kind = str(f.type)
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cli.setup_logging(args.pop("log_level"))
    config_file = args.pop("config", None)
    try:
        base = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        cfg = merge(base, args).validate()
        from pconv.train import run

        summary = run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
