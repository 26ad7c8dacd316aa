#!/usr/bin/env python
"""Export a trained model for other runtimes: ONNX (ONNX Runtime, TensorRT, Triton) or TorchScript (LibTorch).

Examples:
  python pipelines/export.py --model models:/pconv-unet@champion --format onnx --out pconv-unet.onnx
  python pipelines/export.py --model runs/demo/checkpoint_000040 --format torchscript --out pconv-unet.pt

The file holds the network's own contract: inputs `image` (float32 N×3×H×W in [0, 1], holes zeroed) and `mask`
(float32 N×1×H×W, 1 = valid), output `output` (the raw prediction; paste the valid pixels back yourself). H and W
are dynamic, multiples of the stride it prints (2**layer_size). A registered version's export is also logged to its
MLflow run under export/. MLFLOW_TRACKING_URI selects the server for models:/ URIs.
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common
from pconv.inference.export import FORMATS, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint (folder or s3:// prefix) or a local "
                             "MLflow model folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (.onnx) or torchscript (.pt)")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt)")
    parser.add_argument("--no-log", dest="log_artifact", action="store_false",
                        help="do not log the export to the registered version's MLflow run (default: log it)")
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        result = export(args.model, args.format, args.out, log_artifact=args.log_artifact)
        print(f"wrote {result.path} ({result.format}; H and W multiples of {result.stride})"
              + (f"; logged as {result.artifact_uri}" if result.artifact_uri else ""))
        return 0

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
