#!/usr/bin/env python
"""Cost per epoch on spot vs on-demand V100 nodes: a MODEL with its assumptions printed, not a measurement.

The throughput of N GPUs on a node type comes from benchmarks/scaling_model.py (its defaults: 512 px, batch 6 per
GPU, 25 MiB buckets, fp32 gradients), the on-demand price from its NODE_TYPES (us-east-1 list prices). Per epoch of
E images on K nodes:

    T_epoch       = E / predicted images/s                                                       hours
    interruptions = rate x K x T_epoch                (rate: reclaims per node-hour, an ASSUMPTION)
    per interruption every node of the group idles for
        T_redo    = the steps since the last checkpoint: 0 with the notice checkpoint (pconv.train.spot), else
                    half the checkpoint interval on average
        T_restart = worker-group restart to the first batch (--restart-s, measured on this machine) plus the data
                    stream's resume (--resume-s, benchmarks/resume_cost.py)
        T_replace = a fixed-size group waits for a replacement node (launch + image pull); an elastic group
                    (--workers MIN-MAX, issue 26 item 1, not built yet) goes on without it: 0 here
    cost          = K x $/h x (T_epoch + interruptions x (T_redo + T_restart + T_replace))

Spot prices are a fraction of on demand (--spot-fraction, an ASSUMPTION: check `aws ec2
describe-spot-price-history --instance-types p3.2xlarge p3.16xlarge`). docs/operations.md ("Spot nodes") explains
the table. Run:

    python benchmarks/elastic_cost.py                         # 8 and 32 GPUs, 0-10 % reclaims per node-hour
    python benchmarks/elastic_cost.py --gpus 8 --rates 0.05 --spot-fraction 0.4
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_model import NODE_TYPES, Hardware, predict

EPOCH_IMAGES = 1_800_000      # Places2's train split (paper Sec. 4.2)
SPOT_FRACTION = 0.30          # spot / on-demand price: typical of p3 spot in us-east-1, an assumption
CHECKPOINT_MIN = 15.0         # minutes of training between periodic checkpoints
RESTART_S = 8.0               # measured here: a worker group's start to its first batch on a local Ray (CPU)
RESUME_S = 2.43               # benchmarks/resume_cost.py (docs/benchmarks.md): a resume to its first batch
REPLACE_MIN = 7.0             # a p3 launch + image pull + ray start (docs/operations.md step 2: 5-8 min)
NODE_CHOICES = ("p3.2xlarge", "p3.16xlarge")


@dataclass(frozen=True)
class Plan:
    node: str
    gpus: int
    spot: bool
    rate: float          # reclaims per node-hour (0 on demand)
    notice: bool         # the notice checkpoint saves the steps since the last checkpoint
    elastic: bool        # no wait for a replacement node


@dataclass(frozen=True)
class Costs:
    restart_s: float
    resume_s: float
    replace_min: float
    checkpoint_min: float
    spot_fraction: float


def per_epoch(plan: Plan, costs: Costs) -> tuple[float, float, float]:
    """(dollars, hours, expected interruptions) of one epoch."""
    node = NODE_TYPES[plan.node]
    nodes = -(-plan.gpus // node.gpus)
    t_epoch = EPOCH_IMAGES / predict(plan.gpus, hw=Hardware(node=node)).images_per_s / 3600
    interruptions = plan.rate * nodes * t_epoch
    lost_h = ((0.0 if plan.notice else costs.checkpoint_min / 2 / 60) + (costs.restart_s + costs.resume_s) / 3600
              + (0.0 if plan.elastic else costs.replace_min / 60))
    hours = t_epoch + interruptions * lost_h
    price = node.usd_per_hour * (costs.spot_fraction if plan.spot else 1.0)
    return nodes * price * hours, hours, interruptions


def table(gpu_counts: list[int], rates: list[float], costs: Costs) -> list[str]:
    header = (f"{'GPUs':>4} {'node type':<12} {'market':<9} {'reclaims/node-h':>15} {'notice':>6} {'elastic':>7} "
              f"{'interrupts':>10} {'hours':>6} {'$/epoch':>8} {'vs on demand':>12}")
    lines = [header]
    lines.append("-" * len(lines[0]))
    for gpus in gpu_counts:
        base = per_epoch(Plan("p3.16xlarge", gpus, False, 0.0, True, False), costs)[0]  # the cheapest on demand
        for node in NODE_CHOICES:
            dollars, hours, _ = per_epoch(Plan(node, gpus, False, 0.0, True, False), costs)
            lines.append(f"{gpus:>4} {node:<12} {'on-demand':<9} {'-':>15} {'-':>6} {'-':>7} {0:>10.2f} {hours:>6.2f} "
                         f"{dollars:>8.2f} {dollars / base:>12.2f}")
            for rate in rates:
                for notice, elastic in ((False, False), (True, False), (True, True)) if rate else ((True, True),):
                    dollars, hours, n = per_epoch(Plan(node, gpus, True, rate, notice, elastic), costs)
                    lines.append(f"{gpus:>4} {node:<12} {'spot':<9} {rate:>15.0%} {'yes' if notice else 'no':>6} "
                                 f"{'yes' if elastic else 'no':>7} {n:>10.2f} {hours:>6.2f} {dollars:>8.2f} "
                                 f"{dollars / base:>12.2f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.10],
                        help="spot reclaims per node-hour (assumptions)")
    parser.add_argument("--spot-fraction", type=float, default=SPOT_FRACTION, help="spot price / on-demand price")
    parser.add_argument("--restart-s", type=float, default=RESTART_S, help="worker-group restart to its first batch")
    parser.add_argument("--resume-s", type=float, default=RESUME_S, help="data stream resume (resume_cost.py)")
    parser.add_argument("--replace-min", type=float, default=REPLACE_MIN, help="wait for a replacement node")
    parser.add_argument("--checkpoint-min", type=float, default=CHECKPOINT_MIN,
                        help="minutes of training between periodic checkpoints")
    args = parser.parse_args(argv)
    costs = Costs(args.restart_s, args.resume_s, args.replace_min, args.checkpoint_min, args.spot_fraction)
    print(f"assumptions: epoch {EPOCH_IMAGES:,} images at benchmarks/scaling_model.py's predicted images/s; "
          f"on demand {', '.join(f'{n} ${NODE_TYPES[n].usd_per_hour}/h' for n in NODE_CHOICES)}; spot "
          f"{args.spot_fraction:.0%} of it; restart {args.restart_s} s + resume {args.resume_s} s; replacement node "
          f"{args.replace_min} min; periodic checkpoint every {args.checkpoint_min} min")
    print("\n".join(table(args.gpus, args.rates, costs)))
    spot = per_epoch(Plan("p3.2xlarge", 8, True, 0.05, True, False), costs)[0]
    print(f"ratio spot p3.2xlarge (5 %/node-h, notice, fixed size) / on-demand p3.16xlarge, 8 GPUs: "
          f"{spot / per_epoch(Plan('p3.16xlarge', 8, False, 0.0, True, False), costs)[0]:.2f}")


if __name__ == "__main__":
    main()
