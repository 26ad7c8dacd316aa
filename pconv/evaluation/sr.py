"""Evaluation of a super-resolution model against bicubic upsampling, logged to MLflow, with the inpainting
evaluation's promotion rule.

Protocol (on held-back photos: an image shard root, whose ``val`` split is used when it has one, or a folder /
zip / s3:// prefix of image files, STREAMED by :class:`pconv.evaluation.inputs.ImageStream`: ``limit`` N reads N images,
and each decoded batch is scored by the model and the baseline in one pass and dropped, so memory stays bounded):

- each photo is cut to its ``image_size``² centre view (:func:`pconv.core.images.center_crop`, as in the inpainting
  evaluation): this is the HR ground truth;
- the LR input is the HR crop downsampled by K with Pillow's BICUBIC filter (antialiased: Pillow widens the kernel
  when it shrinks, as MATLAB's ``imresize``, the SR literature's usual degradation), rounded to 8 bit;
- the model's raw output is :func:`pconv.inference.super_resolve.super_resolve` with ``paste=False`` (8 bit); the
  baseline's is bicubic upsampling of the same LR image by K (Pillow BICUBIC), also 8 bit;
- the SR protocol (:data:`PROTOCOL`, docs/variants.md "Super-resolution protocol"): EACH method is scored twice, as
  its raw output and as the composite with the LR pixels pasted at the grid (:func:`pconv.core.sr_grid.paste_on_grid`,
  the same paste for both). The pasted model output is exactly what inference returns (``super_resolve``'s default),
  so the pasted composite is the HEADLINE (columns ``psnr_y`` ...; the raw ones are ``raw_psnr_y`` ...). Pasting LR
  pixels (anti-aliased block averages, half a pixel off for even K: :mod:`pconv.core.sr_grid`) instead of HR
  pixels costs a method PSNR, at x2 on photos about half a dB for bicubic; scoring only the model pasted and the
  baseline raw handicapped the model (issue 25). Both views of both methods are in the table;
- PSNR and SSIM (``pconv.core.metrics``) on the BT.601 luma Y (:func:`pconv.core.metrics.rgb_to_y`) and on RGB, with a
  border of K pixels shaved off (the SR literature's convention), averaged over the images.

Headline: PSNR on Y of the pasted composite. The SR literature reports Y-channel PSNR / SSIM (the eye is most
sensitive to luma, and chroma is often upsampled separately), so the Y numbers are the ones to compare with
published tables (which score raw outputs: compare those with the raw rows); RGB is reported beside them.
Promotion (``promote_alias``) calls :func:`pconv.evaluation.inpainting.promote`, the same rule as for inpainting: the
candidate's mean headline PSNR over the same images must be strictly higher than the holder's.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from pconv.evaluation import inputs

from pconv.evaluation import inpainting as evaluation

from pconv.core import images

from pconv.core import metrics
from pconv.core.config import SR_TASK
from pconv.core.sr_grid import paste_on_grid
from pconv.tracking.loading import ModelInfo, parse_registry_uri, resolve_device, resolve_version
from pconv.inference.super_resolve import load_sr_model, super_resolve

log = logging.getLogger(__name__)

SR_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb")  # of the composite with the LR pixels pasted (headline)
RAW_METRICS = tuple(f"raw_{name}" for name in SR_METRICS)  # the same of the raw output
HEADLINE = "psnr_y"            # what promotion compares and what the README reports first (see the module doc)
#: The SR scoring protocol (docs/variants.md, "Super-resolution protocol"): its name, in the table, the results and
#: MLflow (param ``protocol``), and what it means.
PROTOCOL = "lr-pasted"
PROTOCOL_TEXT = ("model and bicubic each scored as the composite with the LR pixels pasted at the grid (K*x + K//2), "
                 "what inference returns (headline), and as the raw output")
RESAMPLE = images.SR_RESAMPLE  # the degradation (training's, pconv.core.images.downsample) and the baseline (upsampling)
BASELINE_NAME = "bicubic upsampling (Pillow)"


class SRMetrics:
    """Per-image SR metrics of one method (:data:`SR_METRICS` of the pasted composite, :data:`RAW_METRICS` of the raw
    output) and their means; ``overall()["psnr"]`` / ``["ssim"]`` are the headline (pasted, Y), so
    :func:`pconv.evaluation.inpainting.beats` / ``promote`` apply unchanged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add(self, **values: float) -> None:
        self.rows.append({k: float(values[k]) for k in SR_METRICS + RAW_METRICS})

    @property
    def count(self) -> int:
        return len(self.rows)

    def overall(self) -> dict[str, Any]:
        means = {k: (sum(r[k] for r in self.rows) / len(self.rows) if self.rows else math.nan)
                 for k in SR_METRICS + RAW_METRICS}
        return {"count": self.count, **means, "psnr": means["psnr_y"], "ssim": means["ssim_y"]}

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall(), "rows": self.rows}


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """The baseline: uint8 ``h x w x 3`` -> uint8 ``hK x wK x 3`` (Pillow BICUBIC)."""
    h, w = lr.shape[:2]
    return np.asarray(Image.fromarray(lr).resize((w * scale, h * scale), RESAMPLE), dtype=np.uint8)


def score(pred: np.ndarray, gt: np.ndarray, scale: int) -> dict[str, float]:
    """PSNR / SSIM on Y and on RGB of two uint8 ``H x W x 3`` images, ``scale`` px shaved off each border."""
    s = slice(scale, -scale)
    p, g = pred[s, s].astype(np.float64) / 255.0, gt[s, s].astype(np.float64) / 255.0
    py, gy = metrics.rgb_to_y(p), metrics.rgb_to_y(g)
    return {"psnr_y": metrics.psnr(py, gy), "ssim_y": metrics.ssim(py, gy),
            "psnr_rgb": metrics.psnr(p, g), "ssim_rgb": metrics.ssim(p, g)}


def paste_lr(hr: np.ndarray, lr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 ``hK x wK x 3`` with the uint8 LR pixels ``h x w x 3`` at the grid: the paste inference applies
    (:func:`pconv.core.sr_grid.paste_on_grid`)."""
    pasted = paste_on_grid(torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1))),
                           torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))), scale)
    return pasted.permute(1, 2, 0).numpy()


def score_protocol(raw: np.ndarray, lr: np.ndarray, gt: np.ndarray, scale: int) -> dict[str, float]:
    """The protocol's scores of one method's raw uint8 output ``raw`` for the LR image ``lr`` of ``gt``:
    :data:`SR_METRICS` of the pasted composite, :data:`RAW_METRICS` of ``raw`` itself."""
    pasted = score(paste_lr(raw, lr, scale), gt, scale)
    return {**pasted, **{f"raw_{k}": v for k, v in score(raw, gt, scale).items()}}


def evaluate_sr_model(model: torch.nn.Module, hr_images: list[np.ndarray], scale: int, batch_size: int = 4,
                      device: str | torch.device | None = None) -> SRMetrics:
    """The model's :class:`SRMetrics` on ``hr_images`` (uint8 ``H x W x 3``, H and W multiples of ``scale``)."""
    table = SRMetrics()
    for i in range(0, len(hr_images), batch_size):
        hr = hr_images[i:i + batch_size]
        lr = np.stack([images.downsample(x, scale) for x in hr])
        batch = torch.from_numpy(lr).permute(0, 3, 1, 2).contiguous()
        out = super_resolve(model, batch, scale, device=device, batch_size=batch_size, paste=False)
        for raw, small, gt in zip(out.permute(0, 2, 3, 1).numpy(), lr, hr):
            table.add(**score_protocol(raw, small, gt, scale))
    return table


def evaluate_bicubic(hr_images: list[np.ndarray], scale: int) -> SRMetrics:
    """Bicubic upsampling's :class:`SRMetrics` on ``hr_images``, under the same protocol as the model."""
    table = SRMetrics()
    for gt in hr_images:
        lr = images.downsample(gt, scale)
        table.add(**score_protocol(bicubic_upsample(lr, scale), lr, gt, scale))
    return table


def evaluate_stream(uri: str, image_size: int, limit: int | None, scale: int, model: torch.nn.Module | None,
                    baseline: bool = True, batch_size: int = 4, device: str | torch.device | None = None,
                    skipped: list[str] | None = None) -> tuple[SRMetrics | None, SRMetrics | None, list[str]]:
    """One streamed pass over the HR images of ``uri``: ``(model table, bicubic table, keys scored)`` (a table is
    None when its method is off). Each batch of decoded centre crops is scored and dropped; unreadable images are
    skipped, logged and appended to ``skipped``; none decodable is a ValueError."""
    table, base, keys = (SRMetrics() if model is not None else None), (SRMetrics() if baseline else None), []
    with inputs.ImageStream(uri, image_size, limit, skipped=skipped) as stream:
        for batch in stream.batches():
            hr = [image for _, image in batch]
            keys += [stream.keys[j] for j, _ in batch]
            if table is not None:
                table.rows += evaluate_sr_model(model, hr, scale, batch_size, device).rows
            if base is not None:
                base.rows += evaluate_bicubic(hr, scale).rows
    if not keys:
        raise ValueError(f"none of the {len(stream)} images under {uri} could be decoded: "
                         f"{list(stream.failed.values())[:3]}")
    return table, base, sorted(keys)


def result_markdown(model_label: str, scale: int, image_size: int, table: SRMetrics,
                    base: SRMetrics | None) -> str:
    lines = [(f"Super-resolution x{scale}: {table.count} held-back photos, {image_size}x{image_size} HR centre "
              f"crops, LR = bicubic downsampling by {scale}; metrics with {scale} px shaved off each border. "
              f"Protocol: {PROTOCOL} ({PROTOCOL_TEXT}). "
              "Headline: PSNR on Y (BT.601 luma, the SR literature's convention) of the LR-pasted output."), "",
             "| method | output | PSNR Y (dB) | SSIM Y | PSNR RGB (dB) | SSIM RGB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, tab in ((f"model: {model_label}", table), (BASELINE_NAME, base)):
        if tab is None:
            continue
        o = tab.overall()
        for output, (py, sy, prgb, srgb) in (("LR pasted (headline)", SR_METRICS), ("raw", RAW_METRICS)):
            lines.append(f"| {label} | {output} | {o[py]:.2f} | {o[sy]:.4f} | {o[prgb]:.2f} | {o[srgb]:.4f} |")
    return "\n".join(lines) + "\n"


def run_sr_evaluation(model_uri: str, images: str, scale: int | None = None,
                      image_size: int = evaluation.DEFAULT_IMAGE_SIZE, limit: int | None = None,
                      batch_size: int = 4, device: str = "auto", baseline: bool = True,
                      experiment: str | None = evaluation.EVAL_EXPERIMENT, promote_alias: str | None = None,
                      tracking_uri: str | None = None,
                      min_delta_db: float = evaluation.DEFAULT_MIN_DELTA_DB) -> dict[str, Any]:
    """Evaluate an SR model (and bicubic) on held-back photos, log to MLflow (``experiment`` None: don't),
    optionally promote. Returns ``{"markdown", "model", "baseline", "scale", "promotion", "mlflow_run_id", ...}``."""
    if promote_alias:
        if not model_uri.startswith("models:/"):
            raise ValueError(f"--promote needs a registered model (models:/NAME@ALIAS or models:/NAME/VERSION), "
                             f"got {model_uri}; register the checkpoint first with pipelines/register.py")
        parse_registry_uri(model_uri)
    dev = resolve_device(device)
    model, info, k = load_sr_model(model_uri, scale, device=dev, tracking_uri=tracking_uri)
    smallest = metrics.SSIM_WINDOW + 2 * k  # SSIM's window must fit after shaving K px off each side
    if image_size % k or image_size < smallest:
        raise ValueError(f"--image-size {image_size} must be a multiple of the scale {k} and at least {smallest}")
    skipped: list[str] = []
    t0 = time.perf_counter()
    table, base, keys = evaluate_stream(images, image_size, limit, k, model, baseline, batch_size, dev, skipped)
    log.info("SR model evaluated on %d images in %.1fs", len(keys), time.perf_counter() - t0)
    result: dict[str, Any] = {"model_uri": model_uri, "model_info": info.as_dict(), "task": SR_TASK, "scale": k,
                              "image_size": image_size, "images": len(keys), "image_keys": keys,
                              "headline": HEADLINE, "protocol": PROTOCOL, "model": table.as_dict(),
                              "baseline": base.as_dict() if base else None,
                              "baseline_name": BASELINE_NAME if base else None, "promotion": None,
                              "skipped": skipped}
    result["markdown"] = result_markdown(model_uri, k, image_size, table, base)
    if promote_alias:
        name, version = resolve_version(model_uri, tracking_uri)

        def evaluate_version(v: str) -> SRMetrics:
            try:
                other, _, _ = load_sr_model(f"models:/{name}/{v}", k, device=dev, tracking_uri=tracking_uri)
            except ValueError as exc:
                raise ValueError(f"cannot compare with {promote_alias!r} version {v} of {name}: {exc}") from None
            return evaluate_stream(images, image_size, limit, k, other, False, batch_size, dev)[0]

        decision = evaluation.promote(name, version, table, evaluate_version, promote_alias, tracking_uri,
                                      min_delta_db)
        result["promotion"] = vars(decision)
        result["markdown"] += (f"\nPromotion to {promote_alias!r}: {'MOVED' if decision.promoted else 'not moved'}"
                               f" - {decision.reason}\n")
    result["mlflow_run_id"] = (_log_result(result, info, table, base, experiment, tracking_uri) if experiment
                               else None)
    return result


def _log_result(result: dict[str, Any], info: ModelInfo, table: SRMetrics, base: SRMetrics | None,
                experiment: str, tracking_uri: str | None) -> str | None:
    """One MLflow run: ``eval/<metric>`` and ``baseline/<metric>`` (:data:`SR_METRICS`, the headline pasted
    composite, and :data:`RAW_METRICS`), param ``protocol`` (:data:`PROTOCOL`), table and JSON."""
    from pconv.tracking.runs import Tracker
    from pconv.tracking.store import start_or_resume_run

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = start_or_resume_run(experiment, f"eval-sr-x{result['scale']}-{stamp}-{secrets.token_hex(3)}",
                                 tags={"pconv.model_uri": result["model_uri"], "pconv.task": SR_TASK},
                                 tracking_uri=tracking_uri)
    tracker = Tracker(run_id, tracking_uri)
    if not tracker:
        return None
    tracker.log_params({"model_uri": result["model_uri"], "task": SR_TASK, "scale": result["scale"],
                        "image_size": result["image_size"], "images": result["images"],
                        "baseline": result["baseline_name"], "headline": HEADLINE, "protocol": PROTOCOL,
                        "shave_px": result["scale"],
                        "downsampling": "Pillow BICUBIC (antialiased)", "model_version": info.version,
                        "model_layer_size": info.layer_size})
    values = {f"eval/{k}": table.overall()[k] for k in SR_METRICS + RAW_METRICS}
    if base is not None:
        values.update({f"baseline/{k}": base.overall()[k] for k in SR_METRICS + RAW_METRICS})
    tracker.log_metrics(values, step=0, model_id=info.model_id)
    tracker.log_text(result["markdown"], "evaluation/table.md")
    tracker.log_dict({k: v for k, v in result.items() if k != "markdown"}, "evaluation/results.json")
    tracker.set_terminated("FINISHED")
    return run_id


__all__ = ["BASELINE_NAME", "HEADLINE", "PROTOCOL", "PROTOCOL_TEXT", "RAW_METRICS", "SR_METRICS", "SRMetrics",
           "bicubic_upsample", "evaluate_bicubic", "evaluate_sr_model", "evaluate_stream", "paste_lr",
           "result_markdown", "run_sr_evaluation", "score", "score_protocol"]
