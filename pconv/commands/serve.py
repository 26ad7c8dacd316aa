#!/usr/bin/env python
"""Serve a PConv model over HTTP with Ray Serve: POST /inpaint (multipart image + mask, white = hole -> PNG),
POST /super-resolve (a super-resolution model: multipart image -> PNG), GET / (a page to paint holes and inpaint),
GET /docs (the OpenAPI page), GET /healthz.

Examples:
  python pipelines/serve.py --model models:/pconv-unet@champion            # follows the alias as it moves
  python pipelines/serve.py --model runs/tiny/checkpoint_000100 --port 8080
  curl -F image=@photo.jpg -F mask=@holes.png -F hole_color=white http://127.0.0.1:8000/inpaint -o filled.png

--model takes any model URI the project accepts (models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint folder
or s3:// prefix, a local MLflow model folder). Runs on the current Ray cluster (RAY_ADDRESS) or starts a local one;
binds 127.0.0.1 unless --host says otherwise. For a cluster, see infra/serve/ (serve deploy).
"""

from __future__ import annotations

import argparse
import sys

from pconv.commands import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint URI or path")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--min-replicas", type=int, default=1, help="autoscaling lower bound (default 1)")
    parser.add_argument("--max-replicas", type=int, default=2, help="autoscaling upper bound (default 2)")
    parser.add_argument("--max-ongoing-requests", type=int, default=8,
                        help="requests a model replica works on at once")
    parser.add_argument("--max-queued-requests", type=int, default=16,
                        help="requests waiting for a model replica before new ones get 503 + Retry-After (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per forward pass (1 = no batching)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000, help="larger images are refused with 413")
    parser.add_argument("--poll-s", type=float, default=10.0, help="seconds between registry checks of an alias")
    common.add_device(parser)
    common.add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)

    def body() -> int:
        from pconv.inference.serve import run

        run(args.model, host=args.host, port=args.port, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests, max_batch_size=args.max_batch_size,
            max_pixels=args.max_pixels, poll_s=args.poll_s, device=args.device)
        return 0

    return common.run(body, prog="serve")


if __name__ == "__main__":
    sys.exit(main())
