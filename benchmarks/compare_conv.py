#!/usr/bin/env python
"""Partial vs gated convolution in the same U-Net, losses, data, steps and seed (issue 18; docs/variants.md).

For each variant (``conv: partial`` and ``conv: gated``) this trains through the normal pipeline
(:func:`pconv.train.driver.run`: Ray Data, Ray Train with one worker, checkpoints, MLflow), with configs that differ ONLY
in ``conv`` and ``run_name``, then evaluates the final checkpoint with the paper's per-bin protocol
(:func:`pconv.evaluation.inpainting.run_evaluation`). Everything goes to ONE MLflow experiment: both training runs, both
evaluation runs, and a summary run holding the comparison table (``compare/table.md``), ``compare/results.json``
and the chart ``compare/compare_conv.png`` (PSNR per hole-ratio bin, and the training loss curves).

  # shards as for training (see README): train split for training, val split for evaluation
  python benchmarks/compare_conv.py --images runs/shards/images --masks runs/shards/masks \\
      --eval-masks runs/shards/test_masks --image-size 64 --steps 150

Defaults are tiny and CPU-sized. With ``--vgg-weights random`` (the default, offline) the perceptual and style
terms are computed on a random VGG16, so the figures compare the two layers under the SAME but not the paper's
loss; read docs/variants.md before quoting them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

CONVS = ("partial", "gated")


def train_variant(conv: str, args: argparse.Namespace, storage: str) -> dict:
    """Train one variant through pconv.train.driver.run; returns its summary (run id, checkpoint, timings, params)."""
    from pconv.core.config import TrainConfig
    from pconv.core.unet import build_model
    from pconv.train.driver import run

    phase2 = max(0, round(args.steps * args.phase2_fraction))
    cfg = TrainConfig(images=args.images, masks=args.masks, image_size=args.image_size, batch_size=args.batch,
                      phase1_steps=args.steps - phase2, phase2_steps=phase2, seed=args.seed, conv=conv,
                      vgg_weights=args.vgg_weights, storage=storage, run_name=f"{args.run_prefix}-{conv}",
                      experiment=args.experiment, register_as="", workers=1, use_gpu=args.gpu,
                      log_every=max(1, args.steps // 50), checkpoint_every=args.steps, val_every=args.steps,
                      sample_every=args.steps, val_size=4)
    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    if summary.status != "finished" or not summary.checkpoint:
        raise RuntimeError(f"{conv}: training did not finish ({summary})")
    params = sum(p.numel() for p in build_model(cfg.validate().layer_size, conv=conv).parameters())
    return {"conv": conv, "run_id": summary.mlflow_run_id, "checkpoint": summary.checkpoint, "steps": summary.step,
            "train_wall_s": wall, "params": params}


def loss_curve(run_id: str | None, key: str = "loss/total") -> list[tuple[int, float]]:
    from pconv.tracking.store import client_for

    if not run_id:
        return []
    return sorted((m.step, m.value) for m in client_for().get_metric_history(run_id, key))


def bin_psnr(rows: list[dict]) -> dict[int, float]:
    """PSNR per hole-ratio bin, border and no-border cells pooled (weighted by their pair counts)."""
    out: dict[int, list[float]] = {}
    for row in rows:
        acc = out.setdefault(int(row["bin"]), [0.0, 0.0])
        acc[0] += row["psnr"] * row["count"]
        acc[1] += row["count"]
    return {b: s / n for b, (s, n) in sorted(out.items()) if n}


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    from pconv.core.masks import HOLE_RATIO_BINS

    head = ["variant", "parameters", "train s/step", "final loss/total", "L1 %", "PSNR dB", "SSIM"]
    bins = [f"PSNR {lo:g}-{hi:g}" for lo, hi in HOLE_RATIO_BINS]
    lines = [f"Same data, seed {args.seed}, {args.steps} steps (phase 2: {args.phase2_fraction:.0%}), batch "
             f"{args.batch}, {args.image_size} px, VGG16 `{args.vgg_weights}`; evaluation: paper protocol, "
             f"{next(iter(results.values()))['pairs']} pairs.", "",
             "| " + " | ".join(head + bins) + " |", "|" + " --- |" * (len(head) + len(bins))]
    for conv, r in results.items():
        o = r["overall"]
        curve = r["loss_curve"]
        per_bin = [f"{r['bin_psnr'].get(b, float('nan')):.2f}" for b in range(len(HOLE_RATIO_BINS))]
        lines.append("| " + " | ".join([conv, f"{r['params']:,}", f"{r['train_wall_s'] / max(1, r['steps']):.2f}",
                                         f"{curve[-1][1]:.4f}" if curve else "n/a", f"{o['l1']:.2f}",
                                         f"{o['psnr']:.2f}", f"{o['ssim']:.4f}", *per_bin]) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pconv.core.masks import HOLE_RATIO_BINS

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(results)
    for i, (conv, r) in enumerate(results.items()):
        xs = [b + (i - (len(results) - 1) / 2) * width for b in r["bin_psnr"]]
        ax1.bar(xs, list(r["bin_psnr"].values()), width, label=conv)
        if r["loss_curve"]:
            ax2.plot([s for s, _ in r["loss_curve"]], [v for _, v in r["loss_curve"]], label=conv)
    ax1.set_xticks(range(len(HOLE_RATIO_BINS)), [f"{lo:g}-{hi:g}" for lo, hi in HOLE_RATIO_BINS])
    ax1.set(xlabel="hole ratio", ylabel="PSNR (dB) of the composite", title="evaluation per hole-ratio bin")
    ax2.set(xlabel="step", ylabel="loss/total", title="training loss", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="image shards (train split for training, val split evaluated)")
    p.add_argument("--masks", required=True, help="mask shards used for training")
    p.add_argument("--eval-masks", required=True, help="mask shards or folder for the per-bin evaluation")
    p.add_argument("--eval-images", default=None, help="evaluation photos (default: the val split of --images)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="training steps per variant (both phases)")
    p.add_argument("--phase2-fraction", type=float, default=0.2, help="share of the steps in phase 2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluation photos (default: all)")
    p.add_argument("--vgg-weights", default="random", help="`random` (offline), `imagenet` or a state-dict URI")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--experiment", default="pconv-compare-conv")
    p.add_argument("--run-prefix", default=f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--storage", default=None, help="checkpoint folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the table, JSON and chart into this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from pconv.evaluation.inpainting import run_evaluation
    from pconv.tracking.runs import Tracker
    from pconv.tracking.store import start_or_resume_run

    ray.init(ignore_reinit_error=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pconv-compare-") as tmp:
        storage = args.storage or str(Path(tmp) / "runs")
        for conv in CONVS:
            r = train_variant(conv, args, storage)
            ev = run_evaluation(r["checkpoint"], args.eval_images or args.images, args.eval_masks, args.image_size,
                                limit=args.limit, device="cuda" if args.gpu else "cpu", baseline=False,
                                experiment=args.experiment)
            r.update(overall=ev["model"]["overall"], rows=ev["model"]["rows"], pairs=ev["pairs"],
                     eval_run_id=ev["mlflow_run_id"], bin_psnr=bin_psnr(ev["model"]["rows"]),
                     loss_curve=loss_curve(r["run_id"]))
            results[conv] = r
        table = markdown(results, args)
        print(table)
        out = Path(args.out) if args.out else Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare_conv.md").write_text(table)
        (out / "compare_conv.json").write_text(json.dumps(results, indent=1, default=str))
        chart(results, out / "compare_conv.png")
        run_id = start_or_resume_run(args.experiment, f"{args.run_prefix}-summary")
        tracker = Tracker(run_id)
        if tracker:
            tracker.log_params({"steps": args.steps, "seed": args.seed, "image_size": args.image_size,
                                "batch": args.batch, "vgg_weights": args.vgg_weights})
            tracker.log_metrics({f"{conv}/{k}": v for conv, r in results.items() for k, v in r["overall"].items()
                                 if k in ("l1", "psnr", "ssim")}, step=0)
            tracker.log_text(table, "compare/table.md")
            tracker.log_text((out / "compare_conv.json").read_text(), "compare/results.json")
            tracker.client.log_artifact(run_id, str(out / "compare_conv.png"), "compare")
            tracker.set_terminated("FINISHED")
            print(f"MLflow: experiment {args.experiment!r}, summary run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
