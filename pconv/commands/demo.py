#!/usr/bin/env python
"""The whole pipeline on real photos in a few minutes (what `make demo` runs; see configs/demo.yaml).

Ingests the CelebA-HQ sample + CBSD68 photos and NVIDIA's irregular test masks from ../shared/datasets into
shards, trains the PConv U-Net through both phases on a local 2-CPU Ray cluster (2 workers), logs to MLflow
(SQLite store under --out), registers the model (alias candidate), evaluates it per hole-ratio bin against a
non-learned baseline, and inpaints held-back images into a grid PNG. Re-running reuses the shards.

Examples:
  python pipelines/demo.py                 # the full demo (< 15 min on 2 CPUs)
  python pipelines/demo.py --tiny          # CI setting: 16 images, 32 px, 2 + 2 steps
  DEMO_S3=1 python pipelines/demo.py       # shards and checkpoints in a local S3 server (moto)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pconv.commands import common
from pconv.apps.demo_inputs import DemoError
from pconv.apps.demo import DemoSettings, run_demo
from pconv.apps.local_s3 import LocalS3Error
from pconv.core.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    defaults = DemoSettings()
    parser.add_argument("--tiny", action="store_true",
                        help="few images/masks, 32 px, 2 + 2 steps (CI, fresh-clone check)")
    parser.add_argument("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    parser.add_argument("--datasets", default=defaults.datasets, help="folder with celeba_hq_sample/, cbsd68/ and "
                        "nvidia_irregular_mask_test.zip (default: ../shared/datasets beside the repo)")
    parser.add_argument("--config", default=defaults.config, help="training config YAML (default: configs/demo.yaml)")
    parser.add_argument("--s3", action="store_true", default=os.environ.get("DEMO_S3", "") not in ("", "0"),
                        help="shards + checkpoints in a local S3 server (moto); default from DEMO_S3=1")
    parser.add_argument("--run-name", help="run name (default: demo-<UTC timestamp>, new each time)")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    for noisy in ("urllib3", "botocore", "alembic", "mlflow", "ray", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kwargs = dict(out=args.out, datasets=args.datasets, config=args.config, s3=args.s3, run_name=args.run_name)
    settings = DemoSettings.tiny_settings(**kwargs) if args.tiny else DemoSettings(**kwargs)
    t0 = time.monotonic()

    def body() -> int:
        result = run_demo(settings)
        print(result.summary())
        print(f"total wall time {time.monotonic() - t0:.0f} s")
        return 0

    return common.run(body, prog="demo: error", expected=(DemoError, ConfigError, LocalS3Error))


if __name__ == "__main__":
    sys.exit(main())
