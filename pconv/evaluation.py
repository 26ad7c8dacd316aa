"""The paper's evaluation protocol (Liu et al., ECCV 2018, Sec. 4.1 / Table 1) per hole-ratio bin, and promotion of
a registered model version to ``champion`` when it beats the current holder on the same pairs. Protocol:

- masks are grouped by the paper's hole-ratio bin (0.01, 0.1] ... (0.5, 0.6] and border flag (holes within
  the 50-px band or not), taken from the mask shards' ``bin``/``border`` columns (computed at ingestion on the
  mask's own resolution) or, for a raw folder/zip of masks, computed the same way here;
- FIXED pairing: images sorted by key; masks of each (bin, border) group sorted by key; image ``j`` is paired
  with mask ``j mod len(group)`` of EVERY group (a cover of the bins; training validation gives each image ONE
  mask), so each image is evaluated once per group and two models see exactly the same pairs;
- each image is resized (shorter side to ``image_size``) and centre-cropped to ``image_size``² by
  :func:`pconv.images.center_crop`, the same view as training validation; masks are resized nearest only;
- metrics (``pconv.metrics``: L1 %, PSNR, SSIM) are computed on the COMPOSITE (valid pixels from the input)
  against the ground truth, and averaged per (bin, border) cell with ``BinnedMetrics``.

The same table is computed for the non-learned :mod:`pconv.baseline`. Files are listed by
:class:`pconv.sources.Source`, shard roots read by :mod:`pconv.shards`, models loaded by :mod:`pconv.loading`.

Promotion rule ("beats"): the candidate's mean PSNR over all evaluated pairs must exceed the champion's by more
than ``min_delta_db`` (default 1e-6 dB, i.e. strictly greater up to float noise), both evaluated here on the
same pairs. Ties and regressions leave the alias where it is, and the decision says why.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pconv import images as I
from pconv import masks as M
from pconv import metrics, shards
from pconv.baseline import baseline_inpaint, baseline_name
from pconv.registry import CHAMPION
from pconv.sources import Source

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 512        # the paper evaluates at 512 x 512 (Sec. 4.1)
DEFAULT_MIN_DELTA_DB = 1e-6
EVAL_EXPERIMENT = "pconv-evaluation"      # MLflow experiment of evaluation runs


# --- Inputs: images, masks, fixed pairs ------------------------------------------------------------------------
def _shard_rows(root: str, columns: list[str], prefer_val: bool = False) -> list[dict[str, Any]]:
    """Rows of a shard root: every split, or with ``prefer_val`` only the ``val`` split when it has shards
    (image datasets ingested for training hold their held-out images there; test sets are all ``train``)."""
    manifest = shards.read_manifest(root)
    splits: tuple[str, ...] = shards.SPLITS
    if prefer_val and shards.shard_uris(root, manifest, "val"):
        splits = ("val",)
        log.info("%s: evaluating on its 'val' split", root)
    uris = [u for split in splits for u in shards.shard_uris(root, manifest, split)]
    return shards.read_table(uris, columns).to_pylist()


def _raw_items(uri: str, suffixes: tuple[str, ...]) -> list[tuple[str, Callable[[], bytes]]]:
    with Source(uri) as src:
        items = [(it.key, it.read) for it in src.items() if it.key.lower().endswith(suffixes)]
        if src.kind == "zip":  # the zip closes with the Source: read now
            items = [(k, (lambda data=read(): data)) for k, read in items]
    return items


@dataclass
class MaskRecord:
    key: str
    bin: int
    border: bool
    data: bytes            # encoded mask
    stored: bool           # True: internal polarity PNG (shards); False: raw file with ``hole_color``


@dataclass
class EvalSet:
    """Images (uint8 S×S×3), masks by group, and the fixed list of (image index, mask record) pairs."""

    image_size: int
    image_keys: list[str]
    images: list[np.ndarray]
    pairs: list[tuple[int, MaskRecord]]
    hole_color: str = "white"
    threshold: float = 0.5
    groups: dict[tuple[int, bool], int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "<file>: <reason>" of every unreadable image or mask

    def mask(self, rec: MaskRecord) -> np.ndarray:
        """uint8 S×S mask (1 = valid), nearest-resized."""
        if rec.stored:
            m = M.decode_stored_mask(rec.data, name=rec.key)
        else:
            m = M.decode_mask(rec.data, self.hole_color, self.threshold, name=rec.key)
        return m if m.shape == (self.image_size,) * 2 else M.resize_nearest(m, self.image_size)


def load_images(uri: str, image_size: int, limit: int | None = None,
                skipped: list[str] | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Eval images from a shard root (manifest.json; its ``val`` split if it has one) or a folder / zip /
    s3:// prefix of image files; sorted by key, the first ``limit``; unreadable files skipped and counted. Each is
    decoded and cut to the centre view by :func:`pconv.images.center_crop`, the same as training validation."""
    if shards.is_dataset_root(uri):
        rows = sorted(_shard_rows(uri, ["key", "image"], prefer_val=True), key=lambda r: r["key"])
        items = [(r["key"], (lambda d=r["image"]: d)) for r in rows]
    else:
        items = sorted(_raw_items(uri, I.IMAGE_SUFFIXES), key=lambda kv: kv[0])
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"no images found under {uri}")
    keys, images, bad = [], [], []
    for key, read in items:
        try:
            images.append(I.center_crop(I.open_image(read(), draft_size=image_size, name=f"{uri}:{key}"), image_size))
            keys.append(key)
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), "; ".join(bad[:5]))
    if skipped is not None:
        skipped.extend(bad)
    if not images:
        raise ValueError(f"none of the {len(items)} images under {uri} could be decoded: {bad[:3]}")
    return keys, images


def load_masks(uri: str, hole_color: str | None = None, threshold: float = 0.5,
               skipped: list[str] | None = None) -> list[MaskRecord]:
    """Masks with their (bin, border) labels from mask shards, or from raw files (``hole_color`` required);
    unreadable raw files are skipped, logged and appended to ``skipped``."""
    if shards.is_dataset_root(uri):
        rows = _shard_rows(uri, ["key", "mask", "bin", "border"])
        return [MaskRecord(r["key"], int(r["bin"]), bool(r["border"]), r["mask"], True) for r in rows]
    if hole_color not in M.HOLE_COLORS:
        raise ValueError(f"{uri} holds raw mask files: say their polarity with --hole-color white|black "
                         "(NVIDIA's test masks: white = hole), or ingest them first with pipelines/prepare_data.py")
    out = []
    for key, read in _raw_items(uri, M.MASK_SUFFIXES):
        try:
            m = M.decode_mask(data := read(), hole_color, threshold, name=f"{uri}:{key}")
        except (ValueError, OSError, Image.DecompressionBombError) as exc:
            log.warning("skipped mask %s: %s", key, exc)
            (skipped if skipped is not None else []).append(f"{uri}:{key}: {exc}")
            continue
        out.append(MaskRecord(key, M.ratio_bin(M.hole_ratio(m)), M.touches_border(m, shards.border_band(*m.shape)),
                              data, False))
    return out


def build_eval_set(images_uri: str, masks_uri: str, image_size: int = DEFAULT_IMAGE_SIZE, limit: int | None = None,
                   hole_color: str | None = None, threshold: float = 0.5) -> EvalSet:
    """Load images and masks and fix the pairing (see the module docstring)."""
    skipped: list[str] = []
    records = load_masks(masks_uri, hole_color, threshold, skipped)
    groups: dict[tuple[int, bool], list[MaskRecord]] = {}
    for rec in records:
        if rec.bin >= 0:
            groups.setdefault((rec.bin, rec.border), []).append(rec)
    if not groups:
        raise ValueError(f"no mask under {masks_uri} falls into the paper's hole-ratio bins (0.01, 0.6]")
    keys, images = load_images(images_uri, image_size, limit, skipped)
    pairs = []
    for gkey in sorted(groups):
        group = sorted(groups[gkey], key=lambda r: r.key)
        pairs.extend((j, group[j % len(group)]) for j in range(len(images)))
    missing = [(b, f) for b in range(len(M.HOLE_RATIO_BINS)) for f in (False, True) if (b, f) not in groups]
    if missing:
        log.warning("no masks for %d (bin, border) cell(s): %s", len(missing), missing)
    return EvalSet(image_size, keys, images, pairs, hole_color or "white", threshold,
                   {k: len(v) for k, v in groups.items()}, skipped)


# --- Running the protocol --------------------------------------------------------------------------------------
def _batches(es: EvalSet, batch_size: int):
    for i in range(0, len(es.pairs), batch_size):
        chunk = es.pairs[i:i + batch_size]
        imgs = np.stack([es.images[j] for j, _ in chunk]).astype(np.float32) / 255.0
        msks = np.stack([es.mask(rec) for _, rec in chunk]).astype(np.float32)
        yield chunk, torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(msks)[:, None]


def _add(table: metrics.BinnedMetrics, chunk, pred: torch.Tensor, gt: torch.Tensor) -> None:
    table.add_batch([rec.bin for _, rec in chunk], [rec.border for _, rec in chunk], metrics.l1_percent(pred, gt),
                    metrics.psnr(pred, gt), metrics.ssim(pred, gt))


def evaluate_model(model: torch.nn.Module, es: EvalSet, batch_size: int = 4,
                   device: str | torch.device | None = None) -> metrics.BinnedMetrics:
    """Per-(bin, border) metrics of the model's composites on the eval set's fixed pairs."""
    from pconv.inference import inpaint

    table = metrics.BinnedMetrics()
    for chunk, image, mask in _batches(es, batch_size):
        comp = inpaint(model, image, mask, device=device, batch_size=batch_size)
        _add(table, chunk, comp.double(), image.double())
    return table


def evaluate_baseline(es: EvalSet, batch_size: int = 8) -> metrics.BinnedMetrics:
    table = metrics.BinnedMetrics()
    for chunk, image, mask in _batches(es, batch_size):
        imgs = image.permute(0, 2, 3, 1).numpy()
        out = np.stack([baseline_inpaint(imgs[k], mask[k, 0].numpy()) for k in range(len(chunk))])
        _add(table, chunk, torch.from_numpy(out).permute(0, 3, 1, 2).double(), image.double())
    return table


def result_markdown(model_label: str, model_table: metrics.BinnedMetrics,
                    baseline_table: metrics.BinnedMetrics | None, es: EvalSet) -> str:
    parts = [f"Evaluation at {es.image_size}x{es.image_size}: {len(es.image_keys)} images x "
             f"{len(es.groups)} (hole-ratio bin, border) groups = {len(es.pairs)} fixed pairs; metrics on the "
             "composite.", "", f"### Model: {model_label}", "", model_table.to_markdown()]
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
    from pconv.tracking import client_for

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
    from pconv.loading import load_model, parse_registry_uri, resolve_device, resolve_version

    if promote_alias and not model_uri.startswith("models:/"):
        raise ValueError(f"--promote needs a registered model (models:/NAME@ALIAS or models:/NAME/VERSION), "
                         f"got {model_uri}; register the checkpoint first with pipelines/register.py")
    if promote_alias:
        parse_registry_uri(model_uri)
    dev = resolve_device(device)
    model, info = load_model(model_uri, device=dev, tracking_uri=tracking_uri)
    es = build_eval_set(images, masks, image_size, limit, hole_color, threshold)
    t0 = time.perf_counter()
    table = evaluate_model(model, es, batch_size, dev)
    log.info("model evaluated on %d pairs in %.1fs", len(es.pairs), time.perf_counter() - t0)
    base = evaluate_baseline(es) if baseline else None
    result: dict[str, Any] = {"model_uri": model_uri, "model_info": {k: v for k, v in info.items()},
                              "image_size": image_size, "pairs": len(es.pairs), "images": len(es.image_keys),
                              "model": table.as_dict(), "baseline": base.as_dict() if base else None,
                              "baseline_name": baseline_name() if base else None, "promotion": None,
                              "skipped": es.skipped}
    result["markdown"] = result_markdown(model_uri, table, base, es)
    if promote_alias:
        name, version = resolve_version(model_uri, tracking_uri)

        def evaluate_version(v: str) -> metrics.BinnedMetrics:
            other, _ = load_model(f"models:/{name}/{v}", device=dev, tracking_uri=tracking_uri)
            return evaluate_model(other, es, batch_size, dev)

        decision = promote(name, version, table, evaluate_version, promote_alias, tracking_uri, min_delta_db)
        result["promotion"] = vars(decision)
        result["markdown"] += f"\nPromotion to {promote_alias!r}: {'MOVED' if decision.promoted else 'not moved'} - " \
                              f"{decision.reason}\n"
    result["mlflow_run_id"] = _log_result(result, table, base, experiment, tracking_uri) if experiment else None
    return result


def _log_result(result: dict[str, Any], table: metrics.BinnedMetrics, base: metrics.BinnedMetrics | None,
                experiment: str, tracking_uri: str | None) -> str | None:
    """One MLflow run per evaluation: per-cell metrics, the markdown table, results JSON and a bar chart."""
    from pconv.tracking import Tracker, start_or_resume_run

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = start_or_resume_run(experiment, f"eval-{stamp}-{secrets.token_hex(3)}",
                                 tags={"pconv.model_uri": result["model_uri"]}, tracking_uri=tracking_uri)
    tracker = Tracker(run_id, tracking_uri)
    if not tracker:
        return None
    info = result["model_info"]
    tracker.log_params({"model_uri": result["model_uri"], "image_size": result["image_size"],
                        "pairs": result["pairs"], "images": result["images"], "baseline": result["baseline_name"],
                        "model_version": info.get("version"), "model_layer_size": info.get("layer_size")})
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
    tracker.log_metrics(values, step=0, model_id=info.get("model_id"))
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


__all__ = ["EvalSet", "MaskRecord", "PromotionDecision", "bar_chart", "beats", "build_eval_set",
           "evaluate_baseline", "evaluate_model", "load_images", "load_masks", "promote", "result_markdown",
           "run_evaluation"]
