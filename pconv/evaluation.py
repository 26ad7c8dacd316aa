"""The paper's evaluation protocol (Liu et al., ECCV 2018, Sec. 4.1 / Table 1), a non-learned baseline, and
promotion of a registered model to ``champion``.

Protocol:

- masks are grouped by the paper's hole-ratio bin (0.01, 0.1] ... (0.5, 0.6] and border flag (holes within
  the 50-px band or not), taken from the mask shards' ``bin``/``border`` columns (computed at ingestion on the
  mask's own resolution) or, for a raw folder/zip of masks, computed the same way here;
- FIXED pairing: images sorted by key; masks of each (bin, border) group sorted by key; image ``j`` is paired
  with mask ``j mod len(group)`` of EVERY group, so each image is evaluated once per group and two models
  evaluated on the same inputs see exactly the same pairs;
- each image is resized (shorter side to ``image_size``) and centre-cropped to ``image_size``² by
  :func:`pconv.images.center_crop`, the same view as training validation; masks are resized nearest only;
- metrics (``pconv.metrics``: L1 %, PSNR, SSIM) are computed on the COMPOSITE (valid pixels from the input)
  against the ground truth, and averaged per (bin, border) cell with ``BinnedMetrics``.

Baseline: OpenCV's Telea inpainting when ``cv2`` is importable, otherwise a push-pull diffusion fill (pyramid
mean fill + Jacobi smoothing of the holes), implemented here in numpy; no learning either way.

Promotion rule ("beats"): the candidate's mean PSNR over all evaluated pairs must exceed the champion's by more
than ``min_delta_db`` (default 1e-6 dB, i.e. strictly greater up to float noise), both evaluated here on the
same pairs. Ties and regressions leave the alias where it is, and the decision says why.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pconv import masks as M
from pconv import metrics
from pconv import storage

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 512        # the paper evaluates at 512 x 512 (Sec. 4.1)
DEFAULT_MIN_DELTA_DB = 1e-6


# ---------------------------------------------------------------------------------------------
# Inputs: images, masks, fixed pairs
# ---------------------------------------------------------------------------------------------
def _is_shard_root(uri: str) -> bool:
    from pconv.shards import MANIFEST

    return not uri.lower().endswith(".zip") and storage.exists(storage.join(uri, MANIFEST))


def _shard_rows(root: str, columns: list[str], prefer_val: bool = False) -> list[dict[str, Any]]:
    """Rows of a shard root: every split, or with ``prefer_val`` only the ``val`` split when it has shards
    (image datasets ingested for training hold their held-out images there; test sets are all ``train``)."""
    from pconv.shards import SPLITS, read_manifest, read_table, shard_uris

    manifest = read_manifest(root)
    splits: tuple[str, ...] = SPLITS
    if prefer_val and shard_uris(root, manifest, "val"):
        splits = ("val",)
        log.info("%s: evaluating on its 'val' split", root)
    uris = [u for split in splits for u in shard_uris(root, manifest, split)]
    return read_table(uris, columns).to_pylist()


def _raw_items(uri: str, suffixes: tuple[str, ...]) -> list[tuple[str, Callable[[], bytes]]]:
    from pconv.sources import Source

    with Source(uri) as src:
        items = [(it.key, it.read) for it in src.items() if it.key.lower().endswith(suffixes)]
        if src.kind == "zip":  # the zip closes with the Source: read now
            items = [(k, (lambda data=read(): data)) for k, read in items]
    return items


def square_crop(data: bytes, size: int, name: str) -> np.ndarray:
    """Decode and cut the centre view (:func:`pconv.images.center_crop`, the same as training validation)."""
    from pconv import images

    return images.center_crop(images.open_image(data, draft_size=size, name=name), size)


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

    def mask(self, rec: MaskRecord) -> np.ndarray:
        """uint8 S×S mask (1 = valid), nearest-resized."""
        if rec.stored:
            m = M.decode_stored_mask(rec.data, name=rec.key)
        else:
            m = M.decode_mask(rec.data, self.hole_color, self.threshold, name=rec.key)
        return m if m.shape == (self.image_size,) * 2 else M.resize_nearest(m, self.image_size)


def load_images(uri: str, image_size: int, limit: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Eval images from a shard root (manifest.json; its ``val`` split if it has one) or a folder / zip /
    s3:// prefix of image files; sorted by key, the first ``limit``; unreadable files skipped and counted."""
    from pconv.images import IMAGE_SUFFIXES

    if _is_shard_root(uri):
        rows = sorted(_shard_rows(uri, ["key", "image"], prefer_val=True), key=lambda r: r["key"])
        items = [(r["key"], (lambda d=r["image"]: d)) for r in rows]
    else:
        items = sorted(_raw_items(uri, IMAGE_SUFFIXES), key=lambda kv: kv[0])
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"no images found under {uri}")
    keys, images, bad = [], [], []
    for key, read in items:
        try:
            images.append(square_crop(read(), image_size, f"{uri}:{key}"))
            keys.append(key)
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), "; ".join(bad[:5]))
    if not images:
        raise ValueError(f"none of the {len(items)} images under {uri} could be decoded: {bad[:3]}")
    return keys, images


def load_masks(uri: str, hole_color: str | None = None, threshold: float = 0.5) -> list[MaskRecord]:
    """Masks with their (bin, border) labels from mask shards, or from raw files (``hole_color`` required)."""
    from pconv.masks import MASK_SUFFIXES
    from pconv.shards import border_band

    if _is_shard_root(uri):
        rows = _shard_rows(uri, ["key", "mask", "bin", "border"])
        return [MaskRecord(r["key"], int(r["bin"]), bool(r["border"]), r["mask"], True) for r in rows]
    if hole_color not in M.HOLE_COLORS:
        raise ValueError(f"{uri} holds raw mask files: say their polarity with --hole-color white|black "
                         "(NVIDIA's test masks: white = hole), or ingest them first with pipelines/prepare_data.py")
    out = []
    for key, read in _raw_items(uri, MASK_SUFFIXES):
        data = read()
        m = M.decode_mask(data, hole_color, threshold, name=f"{uri}:{key}")
        out.append(MaskRecord(key, M.ratio_bin(M.hole_ratio(m)), M.touches_border(m, border_band(*m.shape)),
                              data, False))
    return out


def build_eval_set(images_uri: str, masks_uri: str, image_size: int = DEFAULT_IMAGE_SIZE, limit: int | None = None,
                   hole_color: str | None = None, threshold: float = 0.5) -> EvalSet:
    """Load images and masks and fix the pairing (see the module docstring)."""
    records = load_masks(masks_uri, hole_color, threshold)
    groups: dict[tuple[int, bool], list[MaskRecord]] = {}
    for rec in records:
        if rec.bin >= 0:
            groups.setdefault((rec.bin, rec.border), []).append(rec)
    if not groups:
        raise ValueError(f"no mask under {masks_uri} falls into the paper's hole-ratio bins (0.01, 0.6]")
    keys, images = load_images(images_uri, image_size, limit)
    pairs = []
    for gkey in sorted(groups):
        group = sorted(groups[gkey], key=lambda r: r.key)
        pairs.extend((j, group[j % len(group)]) for j in range(len(images)))
    missing = [(b, f) for b in range(len(M.HOLE_RATIO_BINS)) for f in (False, True) if (b, f) not in groups]
    if missing:
        log.warning("no masks for %d (bin, border) cell(s): %s", len(missing), missing)
    return EvalSet(image_size, keys, images, pairs, hole_color or "white", threshold,
                   {k: len(v) for k, v in groups.items()})


# ---------------------------------------------------------------------------------------------
# Baseline (no learning)
# ---------------------------------------------------------------------------------------------
def _smooth_holes(img: np.ndarray, hole: np.ndarray, iters: int) -> np.ndarray:
    """Jacobi iterations of Laplace's equation inside the holes (valid pixels are boundary values)."""
    for _ in range(iters):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])
        img = np.where(hole[..., None], avg, img)
    return img


def pushpull_fill(image: np.ndarray, valid: np.ndarray, smooth_iters: int = 6) -> np.ndarray:
    """Fill holes (valid == 0) of an H×W×C float image by a mask-weighted image pyramid: each coarser level
    averages the known pixels, holes take the upsampled coarser fill, then a few Jacobi steps smooth them."""
    w = (np.asarray(valid) > 0.5).astype(np.float32)
    img = np.asarray(image, dtype=np.float32) * w[..., None]
    h, wd = w.shape
    if w.all():
        return img
    if not w.any():
        return np.zeros_like(img)
    if h <= 1 or wd <= 1:
        mean = img.sum(axis=(0, 1)) / w.sum()
        return np.where(w[..., None] > 0, img, mean)
    ph, pw = h % 2, wd % 2
    iw = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    ww = np.pad(w, ((0, ph), (0, pw)), mode="edge")
    H2, W2 = iw.shape[0] // 2, iw.shape[1] // 2
    sum_iw = iw.reshape(H2, 2, W2, 2, -1).sum(axis=(1, 3))
    sum_w = ww.reshape(H2, 2, W2, 2).sum(axis=(1, 3))
    coarse = sum_iw / np.maximum(sum_w, 1e-8)[..., None]
    filled = pushpull_fill(coarse, sum_w > 0, smooth_iters)
    up = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)[:h, :wd]
    out = np.where(w[..., None] > 0, img, up)
    return _smooth_holes(out, w == 0, smooth_iters)


def baseline_name() -> str:
    try:
        import cv2  # noqa: F401
        return "OpenCV Telea inpainting"
    except ImportError:
        return "push-pull diffusion fill"


def baseline_inpaint(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Non-learned inpainting of an H×W×3 float image in [0, 1]; valid pixels are returned unchanged."""
    try:
        import cv2
    except ImportError:
        out = pushpull_fill(image, valid)
    else:
        u8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        out = cv2.inpaint(u8, (valid < 0.5).astype(np.uint8), 3, cv2.INPAINT_TELEA).astype(np.float32) / 255.0
    return np.where(valid[..., None] > 0.5, image, np.clip(out, 0, 1))


# ---------------------------------------------------------------------------------------------
# Running the protocol
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------
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
            evaluate_version: Callable[[str], metrics.BinnedMetrics], alias: str = "champion",
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
        client.set_registered_model_alias(name, alias, str(candidate_version))
        decision.promoted = True
        decision.reason = f"no version had alias {alias!r}; version {candidate_version} becomes {alias}"
    elif str(holder.version) == str(candidate_version):
        decision.champion_version = str(holder.version)
        decision.reason = f"version {candidate_version} already has alias {alias!r}; nothing to do"
    else:
        decision.champion_version = str(holder.version)
        champ = evaluate_version(str(holder.version))
        decision.champion_psnr = champ.overall()["psnr"]
        if beats(candidate, champ, min_delta_db):
            client.set_registered_model_alias(name, alias, str(candidate_version))
            decision.promoted = True
            decision.reason = (f"version {candidate_version} beats {alias} version {holder.version} on the same "
                               f"{candidate.count} pairs: mean PSNR {cand_psnr:.4f} > {decision.champion_psnr:.4f} dB")
        else:
            verdict = "ties with" if abs(cand_psnr - decision.champion_psnr) <= min_delta_db else "is worse than"
            decision.reason = (f"version {candidate_version} {verdict} {alias} version {holder.version} on the same "
                               f"{candidate.count} pairs (mean PSNR {cand_psnr:.4f} vs {decision.champion_psnr:.4f} "
                               f"dB); {alias} stays on version {holder.version}")
    log.info("promotion: %s", decision.reason)
    return decision


# ---------------------------------------------------------------------------------------------
# The whole thing (what pipelines/evaluate.py runs)
# ---------------------------------------------------------------------------------------------
def run_evaluation(model_uri: str, images: str, masks: str, image_size: int = DEFAULT_IMAGE_SIZE,
                   limit: int | None = None, hole_color: str | None = None, threshold: float = 0.5,
                   batch_size: int = 4, device: str = "auto", baseline: bool = True,
                   experiment: str | None = "pconv-evaluation", promote_alias: str | None = None,
                   tracking_uri: str | None = None, min_delta_db: float = DEFAULT_MIN_DELTA_DB) -> dict[str, Any]:
    """Evaluate ``model_uri`` (and the baseline) on fixed pairs, log to MLflow (``experiment`` None: don't),
    optionally promote. Returns ``{"markdown", "model", "baseline", "pairs", "promotion", "mlflow_run_id"}``."""
    from pconv.inference import load_model, parse_registry_uri, resolve_device, resolve_version

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
                              "baseline_name": baseline_name() if base else None, "promotion": None}
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

    import secrets

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
            values.update({f"{prefix}/{cell}/{k}": row[k] for k in ("l1", "psnr", "ssim")})
        values.update({f"{prefix}/{k}": tab.overall()[k] for k in ("l1", "psnr", "ssim")})
    tracker.log_metrics(values, step=0)
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


__all__ = ["EvalSet", "MaskRecord", "PromotionDecision", "baseline_inpaint", "bar_chart", "beats",
           "build_eval_set", "evaluate_baseline", "evaluate_model", "load_images", "load_masks", "promote",
           "pushpull_fill", "result_markdown", "run_evaluation", "square_crop"]
