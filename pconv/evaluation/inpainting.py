"""The paper's evaluation protocol (Liu et al., ECCV 2018, Sec. 4.1 / Table 1) per hole-ratio bin, and promotion of
a registered model version to ``champion`` when it beats the current holder on the same pairs. Protocol:

- masks are grouped by the paper's hole-ratio bin (0.01, 0.1] ... (0.5, 0.6] and border flag (holes within
  the 50-px band or not), taken from the mask shards' ``bin``/``border`` columns (computed at ingestion on the
  mask's own resolution) or, for a raw folder/zip of masks, computed the same way here;
- FIXED pairing (:mod:`pconv.evaluation.inputs`): images sorted by key; masks of each (bin, border) group sorted by key;
  image ``j`` is paired with mask ``j mod len(group)`` of EVERY group (a cover of the bins; training validation
  gives each image ONE mask), so each image is evaluated once per group and two models see exactly the same pairs;
- the images are STREAMED (:class:`pconv.evaluation.inputs.ImageStream`): with ``limit`` N only N images are read and
  decoded, and each batch of decoded images is paired with every group, scored by every method (model, baseline)
  in the same pass, and dropped, so memory stays bounded on a set of any size (Places2 val is ~29 GB decoded);
- each image is resized (shorter side to ``image_size``) and centre-cropped to ``image_size``² by
  :func:`pconv.core.images.center_crop`, the same view as training validation; masks are resized nearest only;
- metrics (``pconv.core.metrics``: L1 %, PSNR, SSIM) are computed on the COMPOSITE (valid pixels from the input)
  against the ground truth, and averaged per (bin, border) cell with ``BinnedMetrics``.

The same table is computed for the non-learned :mod:`pconv.inference.baseline`. Images and masks are listed and read by
:mod:`pconv.evaluation.inputs`, models loaded by :mod:`pconv.tracking.loading`.

Promotion rule ("beats"): the candidate's mean PSNR over all evaluated pairs must exceed the champion's by more
than ``min_delta_db`` (default 1e-6 dB, i.e. strictly greater up to float noise), both evaluated here on the
same pairs. Ties and regressions leave the alias where it is, and the decision says why.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pconv.core import metrics
from pconv.inference.baseline import baseline_inpaint, baseline_name
from pconv.evaluation.inputs import EvalSet, MaskRecord, build_eval_set, load_images, load_masks
from pconv.tracking.loading import ModelInfo
from pconv.tracking.registry import CHAMPION

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 512        # the paper evaluates at 512 x 512 (Sec. 4.1)
DEFAULT_MIN_DELTA_DB = 1e-6
EVAL_EXPERIMENT = "pconv-evaluation"      # MLflow experiment of evaluation runs


# --- Running the protocol --------------------------------------------------------------------------------------
Fill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image N×3×S×S, mask N×1×S×S) -> composite


def model_fill(model: torch.nn.Module, batch_size: int = 4, device: str | torch.device | None = None) -> Fill:
    """The model's composite (:func:`pconv.inference.inpaint.inpaint`: valid pixels from the input)."""
    from pconv.inference.inpaint import inpaint

    return lambda image, mask: inpaint(model, image, mask, device=device, batch_size=batch_size)


def baseline_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The non-learned baseline's composite (:func:`pconv.inference.baseline.baseline_inpaint`), image by image."""
    imgs = image.permute(0, 2, 3, 1).numpy()
    out = np.stack([baseline_inpaint(imgs[k], mask[k, 0].numpy()) for k in range(len(imgs))])
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def evaluate_fills(eval_set: EvalSet, fills: dict[str, Fill], batch_size: int = 4) -> dict[str, metrics.BinnedMetrics]:
    """Per-(bin, border) metrics of each fill's composites on the fixed pairs, in ONE streamed pass over the images:
    each batch of decoded images is paired with every group and dropped once its pairs are scored. The numbers do
    not depend on the order or batching in which the images arrive: every fill call gets ``batch_size`` pairs (the
    last chunk is padded with a repeated pair; a net's float result can depend on the batch size), and the per-pair
    values (3 floats per pair and fill) are added to the tables in the fixed pair order at the end. Pairs of
    unreadable images are left out (``eval_set.skipped`` says which)."""
    from tqdm import tqdm

    values = {name: np.full((len(eval_set.pairs), len(metrics.METRIC_NAMES)), np.nan) for name in fills}
    done = np.zeros(len(eval_set.pairs), dtype=bool)
    pixels: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(eval_set.pairs), desc=f"evaluate ({', '.join(fills)})", unit="pair", disable=None,
               dynamic_ncols=True)  # on stderr, and off when it is not a terminal

    def score(chunk: list[int]) -> None:
        padded = chunk + chunk[:1] * (batch_size - len(chunk))
        imgs = np.stack([pixels[eval_set.pairs[p][0]] for p in padded]).astype(np.float32) / 255.0
        image = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        masks = np.stack([eval_set.mask(eval_set.pairs[p][1]) for p in padded])
        mask = torch.from_numpy(masks.astype(np.float32))[:, None]
        gt = image.double()
        for name, fill in fills.items():
            pred = fill(image, mask).double()
            scores = [metrics.l1_percent(pred, gt), metrics.psnr(pred, gt), metrics.ssim(pred, gt)]
            values[name][chunk] = torch.stack(scores, 1)[:len(chunk)].cpu().numpy()
        done[chunk] = True
        bar.update(len(chunk))

    todo: list[int] = []
    for batch in eval_set.image_batches():
        pixels.update(batch)
        todo += eval_set.pair_indices([j for j, _ in batch])
        while len(todo) >= batch_size:
            score(todo[:batch_size])
            todo = todo[batch_size:]
        kept = {eval_set.pairs[p][0] for p in todo}  # only images with pairs still to score
        pixels = {j: pixels[j] for j in kept}
    if todo:
        score(todo)
    bar.close()
    if not done.any():
        raise ValueError(f"none of the {len(eval_set.image_keys)} evaluation images could be decoded: "
                         f"{eval_set.skipped[:3]}")
    keep = np.flatnonzero(done)
    tables = {}
    for name in fills:
        tables[name] = table = metrics.BinnedMetrics()
        table.add_batch([eval_set.pairs[p][1].bin for p in keep], [eval_set.pairs[p][1].border for p in keep],
                        *values[name][keep].T)
    return tables


def evaluate_model(model: torch.nn.Module, eval_set: EvalSet, batch_size: int = 4,
                   device: str | torch.device | None = None) -> metrics.BinnedMetrics:
    """Per-(bin, border) metrics of the model's composites on the eval set's fixed pairs."""
    return evaluate_fills(eval_set, {"model": model_fill(model, batch_size, device)}, batch_size)["model"]


def evaluate_baseline(eval_set: EvalSet, batch_size: int = 8) -> metrics.BinnedMetrics:
    return evaluate_fills(eval_set, {"baseline": baseline_fill}, batch_size)["baseline"]


def result_markdown(model_label: str, model_table: metrics.BinnedMetrics,
                    baseline_table: metrics.BinnedMetrics | None, eval_set: EvalSet) -> str:
    images = len(eval_set.image_keys) - eval_set.failed_images
    parts = [f"Evaluation at {eval_set.image_size}x{eval_set.image_size}: {images} images x "
             f"{len(eval_set.groups)} (hole-ratio bin, border) groups = {model_table.count} fixed pairs; metrics on "
             "the composite.", "", f"### Model: {model_label}", "", model_table.to_markdown()]
    if baseline_table is not None:
        parts += ["", f"### Baseline: {baseline_name()} (no learning)", "", baseline_table.to_markdown()]
    return "\n".join(parts) + "\n"


def bar_chart(model_table: metrics.BinnedMetrics, baseline_table: metrics.BinnedMetrics | None):
    """A matplotlib figure: L1 / PSNR / SSIM per (bin, border) cell, model vs baseline."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = model_table.table(include_empty=False)
    base = {(r["bin"], r["border"]): r for r in (baseline_table.table(include_empty=False) if baseline_table else [])}
    labels = [f"{r['hole_ratio']}\n{'border' if r['border'] else 'no border'}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.9 * len(rows) + 2), 9), sharex=True)
    for ax, key, title in zip(axes, ("l1", "psnr", "ssim"), ("L1 (%) - lower is better", "PSNR (dB)", "SSIM")):
        ax.bar(x - 0.2, [r[key] for r in rows], 0.4, label="model")
        if base:
            ax.bar(x + 0.2, [base.get((r["bin"], r["border"]), {}).get(key, math.nan) for r in rows], 0.4,
                   label=baseline_name())
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[-1].set_xticks(x, labels, fontsize=7)
    fig.tight_layout()
    return fig


# --- Promotion -------------------------------------------------------------------------------------------------
@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    name: str
    alias: str
    candidate_version: str
    champion_version: str | None = None
    candidate_psnr: float | None = None
    champion_psnr: float | None = None


def beats(candidate: metrics.BinnedMetrics, champion: metrics.BinnedMetrics,
          min_delta_db: float = DEFAULT_MIN_DELTA_DB) -> bool:
    """True when the candidate's mean PSNR over the (same) pairs exceeds the champion's by > ``min_delta_db``."""
    if candidate.count != champion.count:
        raise ValueError(f"cannot compare evaluations of different pair sets ({candidate.count} vs "
                         f"{champion.count} pairs)")
    return candidate.overall()["psnr"] > champion.overall()["psnr"] + min_delta_db


def promote(name: str, candidate_version: str, candidate: metrics.BinnedMetrics,
            evaluate_version: Callable[[str], metrics.BinnedMetrics], alias: str = CHAMPION,
            tracking_uri: str | None = None, min_delta_db: float = DEFAULT_MIN_DELTA_DB) -> PromotionDecision:
    """Move ``alias`` of ``name`` to ``candidate_version`` only if it beats the current holder of the alias,
    which ``evaluate_version(version)`` evaluates on the SAME pairs as ``candidate``. No holder: it moves."""
    from pconv.tracking.store import client_for

    client = client_for(tracking_uri)
    cand_psnr = candidate.overall()["psnr"]
    decision = PromotionDecision(False, "", name, alias, str(candidate_version), candidate_psnr=cand_psnr)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 - MLflow raises RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE
        if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        holder = None
    if holder is None:
        decision.promoted = True
        decision.reason = f"no version had alias {alias!r}; version {candidate_version} becomes {alias}"
    elif str(holder.version) == str(candidate_version):
        decision.champion_version = str(holder.version)
        decision.reason = f"version {candidate_version} already has alias {alias!r}; nothing to do"
    else:
        decision.champion_version = str(holder.version)
        champ = evaluate_version(str(holder.version))
        decision.champion_psnr = champ.overall()["psnr"]
        decision.promoted = beats(candidate, champ, min_delta_db)
        if decision.promoted:
            decision.reason = (f"version {candidate_version} beats {alias} version {holder.version} on the same "
                               f"{candidate.count} pairs: mean PSNR {cand_psnr:.4f} > {decision.champion_psnr:.4f} dB")
        else:
            verdict = "ties with" if abs(cand_psnr - decision.champion_psnr) <= min_delta_db else "is worse than"
            decision.reason = (f"version {candidate_version} {verdict} {alias} version {holder.version} on the same "
                               f"{candidate.count} pairs (mean PSNR {cand_psnr:.4f} vs {decision.champion_psnr:.4f} "
                               f"dB); {alias} stays on version {holder.version}")
    if decision.promoted:
        client.set_registered_model_alias(name, alias, str(candidate_version))
    log.info("promotion: %s", decision.reason)
    return decision


# --- The whole thing (what pipelines/evaluate.py runs) ---------------------------------------------------------
def run_evaluation(model_uri: str, images: str, masks: str, image_size: int = DEFAULT_IMAGE_SIZE,
                   limit: int | None = None, hole_color: str | None = None, threshold: float = 0.5,
                   batch_size: int = 4, device: str = "auto", baseline: bool = True,
                   experiment: str | None = EVAL_EXPERIMENT, promote_alias: str | None = None,
                   tracking_uri: str | None = None, min_delta_db: float = DEFAULT_MIN_DELTA_DB) -> dict[str, Any]:
    """Evaluate ``model_uri`` (and the baseline) on fixed pairs, log to MLflow (``experiment`` None: don't),
    optionally promote. Returns ``{"markdown", "model", "baseline", "pairs", "promotion", "mlflow_run_id"}``."""
    from pconv.core.config import INPAINTING_TASK
    from pconv.tracking.loading import load_model, parse_registry_uri, resolve_device, resolve_version

    if promote_alias and not model_uri.startswith("models:/"):
        raise ValueError(f"--promote needs a registered model (models:/NAME@ALIAS or models:/NAME/VERSION), "
                         f"got {model_uri}; register the checkpoint first with pipelines/register.py")
    if promote_alias:
        parse_registry_uri(model_uri)
    dev = resolve_device(device)
    model, info = load_model(model_uri, device=dev, tracking_uri=tracking_uri, task=INPAINTING_TASK)
    eval_set = build_eval_set(images, masks, image_size, limit, hole_color, threshold)
    t0 = time.perf_counter()
    fills = {"model": model_fill(model, batch_size, dev), **({"baseline": baseline_fill} if baseline else {})}
    tables = evaluate_fills(eval_set, fills, batch_size)  # one pass: each image is read and decoded once for both
    table, base = tables["model"], tables.get("baseline")
    log.info("evaluated on %d pairs in %.1fs", table.count, time.perf_counter() - t0)
    result: dict[str, Any] = {"model_uri": model_uri, "model_info": info.as_dict(),
                              "image_size": image_size, "pairs": table.count,
                              "images": len(eval_set.image_keys) - eval_set.failed_images,
                              "model": table.as_dict(), "baseline": base.as_dict() if base else None,
                              "baseline_name": baseline_name() if base else None, "promotion": None,
                              "skipped": eval_set.skipped}
    result["markdown"] = result_markdown(model_uri, table, base, eval_set)
    if promote_alias:
        name, version = resolve_version(model_uri, tracking_uri)

        def evaluate_version(v: str) -> metrics.BinnedMetrics:
            other, _ = load_model(f"models:/{name}/{v}", device=dev, tracking_uri=tracking_uri)
            return evaluate_model(other, eval_set, batch_size, dev)

        decision = promote(name, version, table, evaluate_version, promote_alias, tracking_uri, min_delta_db)
        result["promotion"] = vars(decision)
        result["markdown"] += f"\nPromotion to {promote_alias!r}: {'MOVED' if decision.promoted else 'not moved'} - " \
                              f"{decision.reason}\n"
    eval_set.close()  # (on an error, the stream's finalizer closes it when collected)
    result["mlflow_run_id"] = (_log_result(result, info, table, base, experiment, tracking_uri) if experiment
                               else None)
    return result


def _log_result(result: dict[str, Any], info: ModelInfo, table: metrics.BinnedMetrics,
                base: metrics.BinnedMetrics | None, experiment: str, tracking_uri: str | None) -> str | None:
    """One MLflow run per evaluation: per-cell metrics, the markdown table, results JSON and a bar chart."""
    from pconv.tracking.runs import Tracker
    from pconv.tracking.store import start_or_resume_run

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = start_or_resume_run(experiment, f"eval-{stamp}-{secrets.token_hex(3)}",
                                 tags={"pconv.model_uri": result["model_uri"]}, tracking_uri=tracking_uri)
    tracker = Tracker(run_id, tracking_uri)
    if not tracker:
        return None
    tracker.log_params({"model_uri": result["model_uri"], "image_size": result["image_size"],
                        "pairs": result["pairs"], "images": result["images"], "baseline": result["baseline_name"],
                        "model_version": info.version, "model_layer_size": info.layer_size})
    values: dict[str, float] = {}
    for prefix, tab in (("eval", table), ("baseline", base)):
        if tab is None:
            continue
        for row in tab.table(include_empty=False):
            cell = f"bin{row['bin']}_{'border' if row['border'] else 'noborder'}"
            values.update({f"{prefix}/{cell}/{k}": row[k] for k in metrics.METRIC_NAMES})
        values.update({f"{prefix}/{k}": tab.overall()[k] for k in metrics.METRIC_NAMES})
    # On a registered version, the metrics are also logged against its LoggedModel (MLflow 3 ``model_id``), so the
    # registry shows how each version scored before an alias moves.
    tracker.log_metrics(values, step=0, model_id=info.model_id)
    tracker.log_text(result["markdown"], "evaluation/table.md")
    tracker.log_dict({k: v for k, v in result.items() if k != "markdown"}, "evaluation/results.json")
    try:
        import matplotlib.pyplot as plt

        fig = bar_chart(table, base)
        tracker.log_figure(fig, "evaluation/metrics_by_bin.png")
        plt.close(fig)
    except Exception as exc:  # noqa: BLE001 - a chart must not lose the evaluation
        log.warning("bar chart not logged: %s", exc)
    tracker.set_terminated("FINISHED")
    return run_id


__all__ = ["EvalSet", "Fill", "MaskRecord", "PromotionDecision", "bar_chart", "baseline_fill", "beats",
           "build_eval_set", "evaluate_baseline", "evaluate_fills", "evaluate_model", "load_images", "load_masks",
           "model_fill", "promote", "result_markdown", "run_evaluation"]
