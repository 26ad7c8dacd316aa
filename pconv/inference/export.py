"""A trained net for other runtimes: ONNX (ONNX Runtime, TensorRT, Triton) and TorchScript (LibTorch, Triton).

The exported graph is the network's own contract, the same as :attr:`pconv.inference.api.Inpainter.model`:

- inputs ``image`` (float32 ``N×3×H×W`` in [0, 1], holes zeroed) and ``mask`` (float32 ``N×1×H×W``, 1 = valid);
- output ``output``: the raw prediction ``N×3×H×W`` (the caller pastes the valid pixels back: ``mask·image +
  (1 − mask)·output`` is the paper's composite);
- ``H`` and ``W`` are dynamic, multiples of the net's stride ``2**layer_size`` (the U-Net halves them ``layer_size``
  times); pad other sizes first, as :func:`pconv.inference.inpaint.inpaint` does.

A super-resolution model exports the same way: its ``image`` is the LR canvas on the SR grid and ``mask`` the grid
(:func:`pconv.core.sr_grid.place_on_grid`).

ONNX: torch's dynamo exporter (opset 18), with one translation of our own: the partial convolution's window sum is
``avg_pool2d(divisor_override=1)`` (exact sum pooling, :meth:`pconv.core.layers.PartialConv2d.window_sum`), which
ONNX's AveragePool cannot say, so it becomes AveragePool × kernel area. TorchScript: ``torch.jit.trace`` (the net
has no data-dependent control flow; shapes stay symbolic). A registered model's export is logged to its version's
run as an artifact under ``export/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pconv.core.unet import PConvUNet
from pconv.storage import uris
from pconv.tracking import store
from pconv.tracking.loading import REGISTRY_KIND, ModelInfo, load_model

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAMES, OUTPUT_NAME = ("image", "mask"), "output"
ONNX_OPSET = 18
ARTIFACT_DIR = "export"  # where the file goes in a registered version's run


class RawPrediction(nn.Module):
    """The U-Net with one output: ``forward(image, mask) -> raw prediction`` (the net's own inputs, no padding, no
    paste-back), which is what runtimes and :attr:`Inpainter.model` serve."""

    def __init__(self, net: PConvUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.net(image, mask)[0]


@dataclass(frozen=True)
class ExportResult:
    path: str                # the written file
    format: str              # onnx | torchscript
    stride: int              # H and W must be multiples of it
    model: ModelInfo         # what was exported
    artifact_uri: str | None = None  # where it was logged in MLflow (registered models)


def _example(net: PConvUNet) -> tuple[Tensor, Tensor]:
    """A deterministic example at twice the stride (trace shapes stay symbolic; the values do not matter)."""
    side = 2 * 2 ** net.layer_size
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, side, side, generator=gen) > 0.25).float()
    return torch.rand(1, net.in_channels, side, side, generator=gen) * mask, mask


def _avg_pool2d_translation():
    """ONNX translation of ``aten.avg_pool2d`` that honours ``divisor_override`` (AveragePool × area / divisor)."""
    from onnxscript import opset18 as op

    def avg_pool2d(self, kernel_size, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
        kh, kw = kernel_size
        sh, sw = stride if stride else kernel_size
        ph, pw = padding
        pooled = op.AveragePool(self, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                                count_include_pad=1 if count_include_pad else 0, ceil_mode=1 if ceil_mode else 0)
        if divisor_override is None:
            return pooled
        return op.Mul(pooled, op.CastLike(op.Constant(value_float=float(kh * kw) / float(divisor_override)), pooled))

    return {torch.ops.aten.avg_pool2d.default: avg_pool2d}


def export_onnx(net: PConvUNet, out: str | Path) -> None:
    """``net`` as ONNX at ``out``: batch, height and width dynamic (height and width multiples of the stride)."""
    stride = 2 ** net.layer_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims = {name: {0: batch, 2: stride * torch.export.Dim(f"{name}_h_blocks", min=1, max=1024),
                   3: stride * torch.export.Dim(f"{name}_w_blocks", min=1, max=1024)} for name in INPUT_NAMES}
    dims["mask"] = {0: batch, 2: dims["image"][2], 3: dims["image"][3]}
    with torch.no_grad():
        torch.onnx.export(RawPrediction(net).eval(), _example(net), str(out), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_shapes={"image": dims["image"], "mask": dims["mask"]},
                          opset_version=ONNX_OPSET, dynamo=True, verbose=False,
                          custom_translation_table=_avg_pool2d_translation())


def export_torchscript(net: PConvUNet, out: str | Path) -> None:
    """``net`` as a traced TorchScript module at ``out`` (``torch.jit.load(out)(image, mask)``)."""
    with torch.no_grad():
        traced = torch.jit.trace(RawPrediction(net).eval(), _example(net), check_trace=False)
    traced.save(str(out))


def export(model_uri: str, fmt: str, out: str | Path, *, tracking_uri: str | None = None,
           log_artifact: bool = True) -> ExportResult:
    """Export the model at ``model_uri`` (any URI :func:`pconv.tracking.loading.load_model` takes) as ``fmt`` to
    ``out`` (written atomically: a failed export leaves no file). A registered version's export is logged to its
    run (``log_artifact``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix != SUFFIXES[fmt]:
        raise ValueError(f"{out}: a {fmt} file should end in {SUFFIXES[fmt]}")
    net, info = load_model(model_uri, device="cpu", tracking_uri=tracking_uri)
    net = net.float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        (export_onnx if fmt == "onnx" else export_torchscript)(net, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (%s, layer_size %d) as %s: %s", info.uri, info.conv, info.layer_size, fmt, out)
    artifact = _log_to_run(info, out, tracking_uri) if log_artifact and info.kind == REGISTRY_KIND else None
    return ExportResult(str(out), fmt, 2 ** net.layer_size, info, artifact)


def _log_to_run(info: ModelInfo, path: Path, tracking_uri: str | None) -> str:
    """Log ``path`` to the run that produced registered version ``info`` (under ``export/``); its artifact URI."""
    client = store.client_for(store.resolve_tracking_uri(tracking_uri))
    run_id = client.get_model_version(info.name, info.version).run_id
    if not run_id:
        raise RuntimeError(f"{info.uri}: version {info.version} names no run to log the export to")
    client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    artifact_uri = uris.join(client.get_run(run_id).info.artifact_uri, ARTIFACT_DIR, path.name)
    log.info("logged the export to run %s: %s", run_id, artifact_uri)
    return artifact_uri


__all__ = ["ARTIFACT_DIR", "ExportResult", "FORMATS", "INPUT_NAMES", "OUTPUT_NAME", "RawPrediction", "export",
           "export_onnx", "export_torchscript"]
