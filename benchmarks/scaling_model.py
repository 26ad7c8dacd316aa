#!/usr/bin/env python
"""Analytic model of data-parallel (DDP) scaling of PConv U-Net training on AWS V100 nodes.

What it models, per training step of one GPU (batch ``B`` images, 512 px, the paper's 8-layer net):

* compute: convolution FLOPs counted from the architecture (multiply-add = 2 FLOPs):
  - PConv U-Net forward (encoder 7x7/64, 5x5/128, 5x5/256, 3x3/512 x5, all stride 2; decoder 3x3 convs over
    [upsampled | skip] concatenations) and backward (2x forward: input and weight gradients; the first layer
    needs no input gradient);
  - VGG16 up to pool3 (the perceptual/style feature extractor, frozen) on three images (output, composite,
    ground truth); backward only through output and composite and only input gradients (frozen weights: 1x);
  - Gram matrices of the style loss (3 layers x 3 images);
  at an effective V100 throughput = peak tensor-core FLOP/s x utilisation (``--mfu``);
* communication: DDP all-reduces the fp32 gradients (~32.9 M parameters) in buckets (``--bucket-mb``) as the
  U-Net backward produces them. Each bucket costs a hierarchical ring all-reduce: 2(g-1)/g x bytes over NVLink
  inside a node and 2(m-1)/m x bytes over the node's network link between m nodes, plus a per-hop latency.
  Buckets are reduced one after the other, each as soon as it is ready and the link is free, so they overlap
  with the rest of the U-Net backward, but not with the VGG backward, which runs before any U-Net gradient exists;
* data loading: CPU time per sample (JPEG decode, crop, mask decode + augmentation) against the vCPUs per GPU;
  if the CPUs cannot keep up, the step waits for data.

It prints the predicted step time, images/s and scaling efficiency for 1, 8, 16, 32 and 64 V100s, then the batch
size / bucket / gradient-precision choices that keep efficiency >= 90%. ``--measured-step-ms`` calibrates the
utilisation from a measured single-GPU step (same batch size); ``--measure-cpu`` times the CPU side of data
loading on this machine with the real datasets. Explanation and results: docs/scaling.md.

    python benchmarks/scaling_model.py
    python benchmarks/scaling_model.py --measured-step-ms 180 --batch-per-gpu 6
    python benchmarks/scaling_model.py --node-type p3.2xlarge      # 1 GPU per node: every step crosses the network
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

# ------------------------------------------------------------------------------------------------ architecture
# The architecture is the model's own: the PConv U-Net's layer specs (pconv.core.unet: encoder_spec / decoder_spec, the
# paper's supplementary Table 1) and the VGG16 layers up to pool3 that the perceptual and style losses read
# (pconv.core.losses, paper eq. 3-6: pool1, pool2, pool3).
from pconv.core.losses import VGG16_UP_TO_POOL3  # noqa: E402 - output channels, "M" = 2x2 max pool
from pconv.core.unet import (DECODER_KERNEL, PAPER_IMAGE_SIZE, PAPER_LAYER_SIZE, decoder_spec,  # noqa: E402
                             encoder_spec)

VGG_POOL = "M"


@dataclass(frozen=True)
class ConvLayer:
    """One k x k convolution producing ``cout`` x ``h_out`` x ``w_out`` from ``cin`` channels."""

    name: str
    k: int
    cin: int
    cout: int
    h_out: int
    w_out: int
    batch_norm: bool = False

    @property
    def flops(self) -> float:
        """Forward FLOPs for one image: 2 (multiply + add) x k^2 x cin x cout x h_out x w_out."""
        return conv_flops(self.k, self.cin, self.cout, self.h_out, self.w_out)

    @property
    def params(self) -> int:
        """Weights, plus BatchNorm's scale/shift, or a bias when there is no BatchNorm."""
        return self.k * self.k * self.cin * self.cout + (2 * self.cout if self.batch_norm else self.cout)


def conv_flops(k: int, cin: int, cout: int, h_out: int, w_out: int) -> float:
    """FLOPs of a dense k x k convolution for one image (a multiply-add counts as 2)."""
    if min(k, cin, cout, h_out, w_out) < 1:
        raise ValueError(f"convolution dimensions must be >= 1, got k={k} cin={cin} cout={cout} "
                         f"out={h_out}x{w_out}")
    return 2.0 * k * k * cin * cout * h_out * w_out


def unet_layers(image_size: int = PAPER_IMAGE_SIZE, layer_size: int = PAPER_LAYER_SIZE, in_channels: int = 3,
                out_channels: int = 3) -> list[ConvLayer]:
    """The PConv U-Net's convolutions in forward order (encoder PConv1..L, then decoder PConvL+1..2L)."""
    encoder = encoder_spec(layer_size)  # ValueError outside 1..PAPER_LAYER_SIZE
    if image_size % (2 ** layer_size):
        raise ValueError(f"image_size {image_size} is not divisible by 2**layer_size = {2 ** layer_size}")
    layers, cin, size = [], in_channels, image_size
    for i, (k, cout, batch_norm) in enumerate(encoder):
        size //= 2
        layers.append(ConvLayer(f"enc{i + 1}", k, cin, cout, size, size, batch_norm=batch_norm))
        cin = cout
    for i, (below, skip, cout, batch_norm) in enumerate(decoder_spec(layer_size, in_channels, out_channels)):
        size *= 2  # deepest decoder layer first
        layers.append(ConvLayer(f"dec{layer_size + i + 1}", DECODER_KERNEL, below + skip, cout, size, size,
                                batch_norm=batch_norm))
    return layers


def vgg_layers(image_size: int = PAPER_IMAGE_SIZE) -> list[ConvLayer]:
    """VGG16's convolutions up to pool3 (3x3, stride 1, same padding) for one image."""
    layers, size, cin = [], image_size, 3
    for item in VGG16_UP_TO_POOL3:
        if item == VGG_POOL:
            size //= 2
            continue
        layers.append(ConvLayer(f"vgg{len(layers) + 1}", 3, cin, int(item), size, size))
        cin = int(item)
    return layers


def gram_flops(image_size: int = PAPER_IMAGE_SIZE) -> float:
    """FLOPs of the style loss's Gram matrices (C x C from C x HW features) at pool1, pool2, pool3, one image."""
    total, size, channels = 0.0, image_size, 0
    for item in VGG16_UP_TO_POOL3:
        if item == VGG_POOL:
            size //= 2
            total += 2.0 * channels * channels * size * size
        else:
            channels = int(item)
    return total


def unet_params(layer_size: int = PAPER_LAYER_SIZE) -> int:
    """Trainable parameters of the PConv U-Net (does not depend on the image size)."""
    return sum(layer.params for layer in unet_layers(2 ** layer_size, layer_size))


@dataclass(frozen=True)
class StepFlops:
    """FLOPs for ONE training image (multiply the totals by the batch size)."""

    unet_forward: float
    unet_backward: float
    vgg_forward: float
    vgg_backward: float
    gram_forward: float
    gram_backward: float
    per_layer_backward: tuple[tuple[str, float, int], ...]  # (layer, backward FLOPs, params), forward order

    @property
    def total(self) -> float:
        return (self.unet_forward + self.unet_backward + self.vgg_forward + self.vgg_backward
                + self.gram_forward + self.gram_backward)


def step_flops(image_size: int = PAPER_IMAGE_SIZE, layer_size: int = PAPER_LAYER_SIZE, vgg_images: int = 3, vgg_backward_images: int = 2,
               unet_backward_factor: float = 2.0, vgg_backward_factor: float = 1.0) -> StepFlops:
    """Per-image FLOPs of one training step (forward + backward of the U-Net, VGG16 loss network, Gram matrices).

    ``unet_backward_factor`` 2: input and weight gradients each cost about one forward; the first layer's input is
    the image, which needs no gradient (factor 1 there). ``vgg_backward_factor`` 1: VGG16 is frozen, so only input
    gradients flow, through the output and composite images (``vgg_backward_images`` = 2; the ground truth's
    features need no gradient).
    """
    layers = unet_layers(image_size, layer_size)
    per_layer = tuple((layer.name, layer.flops * (unet_backward_factor / 2 if i == 0 else unet_backward_factor),
                       layer.params) for i, layer in enumerate(layers))
    vgg_fwd_one = sum(layer.flops for layer in vgg_layers(image_size))
    gram_one = gram_flops(image_size)
    return StepFlops(
        unet_forward=sum(layer.flops for layer in layers),
        unet_backward=sum(f for _, f, _ in per_layer),
        vgg_forward=vgg_images * vgg_fwd_one,
        vgg_backward=vgg_backward_images * vgg_backward_factor * vgg_fwd_one,
        gram_forward=gram_one * vgg_images,
        gram_backward=gram_one * 2 * vgg_backward_images,   # gradient of F^T F reaches F through both operands
        per_layer_backward=per_layer,
    )


# ------------------------------------------------------------------------------------------------ hardware
@dataclass(frozen=True)
class NodeType:
    """An EC2 GPU instance type as the model needs it."""

    name: str
    gpus: int
    vcpus: int
    network_gbit: float           # nominal network bandwidth per node (Gbit/s)
    nvlink_gbyte_s: float | None  # effective all-reduce bus bandwidth between the node's GPUs (GB/s); None: 1 GPU
    usd_per_hour: float           # us-east-1 on-demand Linux list price (changes; see docs/operations.md)


# AWS's P3 announcement table: p3.2xlarge 1 GPU / 8 vCPU / up to 10 Gbit/s; p3.8xlarge 4 GPUs / 32 vCPU / 10 Gbit/s
# (NVLink); p3.16xlarge 8 GPUs / 64 vCPU / 25 Gbit/s (NVLink, 300 GB/s aggregate). The NVLink figures are assumed
# NCCL bus bandwidths, not measurements: override with --nvlink-gbyte-s. p3dn.24xlarge (8 x V100 32 GB, 96 vCPU,
# 100 Gbit/s with EFA) is not in ray_cluster.yaml; it is here to show what the network buys.
NODE_TYPES: dict[str, NodeType] = {
    "p3.2xlarge": NodeType("p3.2xlarge", 1, 8, 10.0, None, 3.06),
    "p3.8xlarge": NodeType("p3.8xlarge", 4, 32, 10.0, 100.0, 12.24),
    "p3.16xlarge": NodeType("p3.16xlarge", 8, 64, 25.0, 150.0, 24.48),
    "p3dn.24xlarge": NodeType("p3dn.24xlarge", 8, 96, 100.0, 150.0, 31.212),
}


@dataclass(frozen=True)
class Hardware:
    """The knobs of the cost model (defaults: V100 on p3.16xlarge)."""

    peak_tflops: float = 125.0        # V100 fp16 tensor-core peak (NVIDIA/AWS: "125 TFLOPS mixed precision")
    mfu: float = 0.25                 # fraction of peak reached by the whole step (see docs/scaling.md)
    node: NodeType = NODE_TYPES["p3.16xlarge"]
    nvlink_gbyte_s: float | None = None  # None: the node type's value
    net_efficiency: float = 0.8       # NCCL over TCP sockets (no EFA on P3 below p3dn): share of nominal bandwidth
    intra_latency_s: float = 10e-6    # per ring step inside a node
    inter_latency_s: float = 30e-6    # per ring step between nodes
    hbm_gbyte_s: float = 900.0        # V100 memory bandwidth, for the (memory-bound) Adam update
    vcpu_efficiency: float = 0.6      # a vCPU is a hyper-thread: ~0.6 of a core for decode work

    @property
    def effective_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu

    @property
    def bus_gbyte_s(self) -> float | None:
        return self.nvlink_gbyte_s if self.nvlink_gbyte_s is not None else self.node.nvlink_gbyte_s


@dataclass(frozen=True)
class TrainSetup:
    """The job's choices that matter for scaling."""

    image_size: int = PAPER_IMAGE_SIZE
    layer_size: int = PAPER_LAYER_SIZE
    batch_per_gpu: int = 6            # the paper's batch on one V100 (Sec. 4.1)
    bucket_mb: float = 25.0           # DDP's default bucket_cap_mb
    grad_bytes: int = 4               # fp32 gradients (AMP keeps fp32 master weights); 2 = fp16 compression hook
    # decode + crop + mask decode/augmentation on one core: ~25 ms measured with --measure-cpu on an AMD EPYC
    # core of the development machine; P3's Broadwell Xeons (2.3-2.7 GHz) are slower per core, hence 30.
    cpu_ms_per_sample: float = 30.0


def ring_allreduce_s(nbytes: float, n: int, gbyte_s: float, latency_s: float) -> float:
    """Ring all-reduce of ``nbytes`` among ``n`` peers: 2(n-1)/n x bytes at ``gbyte_s``, 2(n-1) latency steps."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (gbyte_s * 1e9) + 2 * (n - 1) * latency_s


def allreduce_s(nbytes: float, n_gpus: int, hw: Hardware) -> float:
    """Hierarchical all-reduce on ``n_gpus`` spread over full nodes of ``hw.node``.

    Inside a node: reduce-scatter + all-gather over NVLink (a ring over the node's GPUs). Between nodes: every
    node's network link carries 2(m-1)/m of the buffer (ring over m nodes; the node's GPUs share one link).
    """
    g = min(n_gpus, hw.node.gpus)
    m = math.ceil(n_gpus / hw.node.gpus)
    t = 0.0
    if g > 1:
        bus = hw.bus_gbyte_s
        if bus is None:
            raise ValueError(f"{hw.node.name} has one GPU per node; cannot place {g} GPUs on one node")
        t += ring_allreduce_s(nbytes, g, bus, hw.intra_latency_s)
    if m > 1:
        t += ring_allreduce_s(nbytes, m, hw.node.network_gbit / 8 * hw.net_efficiency, hw.inter_latency_s)
    return t


@dataclass(frozen=True)
class Prediction:
    """Predicted step of one configuration."""

    gpus: int
    nodes: int
    batch_per_gpu: int
    bucket_mb: float
    grad_bytes: int
    compute_s: float          # forward + backward + optimizer on one GPU
    comm_s: float             # all-reduce time of all buckets (if nothing overlapped)
    exposed_comm_s: float     # communication not hidden behind the backward pass
    data_s: float             # CPU time per step the node's vCPUs need for one GPU's batch
    step_s: float
    baseline_step_s: float    # same batch on one GPU, no communication

    @property
    def images_per_s(self) -> float:
        return self.gpus * self.batch_per_gpu / self.step_s

    @property
    def efficiency(self) -> float:
        """Throughput relative to ``gpus`` x the single-GPU throughput (1.0 = linear scaling)."""
        return self.baseline_step_s / self.step_s

    @property
    def data_cpu_load(self) -> float:
        """Share of the node's usable CPU the data pipeline needs at this step time (> 1: data-bound)."""
        return self.data_s / self.step_s


def buckets(per_layer_backward: Sequence[tuple[str, float, int]], bucket_bytes: float,
            grad_bytes: int) -> list[tuple[int, float]]:
    """DDP-style buckets: gradients in reverse layer order, a bucket closes once it holds >= ``bucket_bytes``.

    Returns (index of the layer whose backward completes the bucket, in REVERSE order, bucket bytes).
    """
    out, acc, order = [], 0.0, list(reversed(per_layer_backward))
    for i, (_, _, params) in enumerate(order):
        acc += params * grad_bytes
        if acc >= bucket_bytes or i == len(order) - 1:
            out.append((i, acc))
            acc = 0.0
    return out


def predict(n_gpus: int, setup: TrainSetup = TrainSetup(), hw: Hardware = Hardware(),
            flops: StepFlops | None = None) -> Prediction:
    """Simulate one DDP step on ``n_gpus`` V100s: compute timeline, bucketed all-reduce overlap, data loading."""
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    if setup.batch_per_gpu < 1 or setup.bucket_mb <= 0 or setup.grad_bytes not in (2, 4):
        raise ValueError(f"invalid setup: {setup}")
    flops = flops or step_flops(setup.image_size, setup.layer_size)
    b, rate = setup.batch_per_gpu, hw.effective_flops
    params = sum(p for _, _, p in flops.per_layer_backward)
    # Adam: read param, grad, 2 moments; write param, 2 moments (fp32): ~7 x 4 bytes per parameter.
    optimizer_s = params * 28 / (hw.hbm_gbyte_s * 1e9)
    forward_s = b * (flops.unet_forward + flops.vgg_forward + flops.gram_forward) / rate
    loss_backward_s = b * (flops.vgg_backward + flops.gram_backward) / rate   # before any U-Net gradient exists
    t = forward_s + loss_backward_s
    ready = []                                  # time at which each layer's gradient is ready (reverse order)
    for _, bwd, _ in reversed(flops.per_layer_backward):
        t += b * bwd / rate
        ready.append(t)
    backward_end = t
    compute_s = backward_end + optimizer_s

    comm_free, comm_total = 0.0, 0.0
    for last_layer, nbytes in buckets(flops.per_layer_backward, setup.bucket_mb * 2 ** 20, setup.grad_bytes):
        duration = allreduce_s(nbytes, n_gpus, hw)
        comm_total += duration
        comm_free = max(comm_free, ready[last_layer]) + duration
    exposed = max(0.0, comm_free - backward_end) if n_gpus > 1 else 0.0
    gpu_step = compute_s + exposed

    usable_cores = hw.node.vcpus / hw.node.gpus * hw.vcpu_efficiency
    data_s = b * setup.cpu_ms_per_sample / 1e3 / usable_cores
    step = max(gpu_step, data_s)                # prefetching hides data loading unless the CPUs are too slow
    baseline = max(compute_s, data_s)
    return Prediction(n_gpus, math.ceil(n_gpus / hw.node.gpus), b, setup.bucket_mb, setup.grad_bytes, compute_s,
                      comm_total if n_gpus > 1 else 0.0, exposed, data_s, step, baseline)


def calibrate_mfu(measured_step_ms: float, setup: TrainSetup, hw: Hardware) -> float:
    """The utilisation that makes the model's single-GPU step equal a measured one (same batch size)."""
    if measured_step_ms <= 0:
        raise ValueError(f"measured step time must be > 0 ms, got {measured_step_ms}")
    flops = step_flops(setup.image_size, setup.layer_size)
    params = sum(p for _, _, p in flops.per_layer_backward)
    compute_ms = measured_step_ms - params * 28 / (hw.hbm_gbyte_s * 1e9) * 1e3
    if compute_ms <= 0:
        raise ValueError(f"measured step of {measured_step_ms} ms is shorter than the optimizer update alone")
    return setup.batch_per_gpu * flops.total / (compute_ms / 1e3) / (hw.peak_tflops * 1e12)


def settings_for_efficiency(n_gpus: int, target: float, hw: Hardware, base: TrainSetup,
                            batches: Iterable[int] = (2, 4, 6, 8, 12, 16),
                            bucket_mbs: Iterable[float] = (5, 25, 100),
                            grad_bytes: Iterable[int] = (4, 2)) -> list[Prediction]:
    """All (batch per GPU, bucket size, gradient precision) combinations predicted to reach ``target``."""
    hits = []
    for gb in grad_bytes:
        for b in batches:
            for mb in bucket_mbs:
                p = predict(n_gpus, dataclasses.replace(base, batch_per_gpu=b, bucket_mb=mb, grad_bytes=gb), hw)
                if p.efficiency >= target:
                    hits.append(p)
    return hits


def measure_cpu_ms_per_sample(datasets_dir: Path, image_size: int = PAPER_IMAGE_SIZE, n: int = 20) -> float:
    """Time the CPU side of one training sample on this machine with the real datasets, single thread.

    A CelebA-HQ photo re-encoded as a JPEG of the training size is decoded and cropped; an NVIDIA test mask is
    decoded and augmented with the pipeline's own ``pconv.core.masks.augment_mask``.
    """
    import io
    import time
    import zipfile

    import numpy as np
    from PIL import Image

    from pconv.core import masks
    photos = sorted((datasets_dir / "celeba_hq_sample").glob("*.jpg"))[:n]
    mask_zip = datasets_dir / "nvidia_irregular_mask_test.zip"
    if not photos or not mask_zip.exists():
        raise FileNotFoundError(f"need celeba_hq_sample/*.jpg and nvidia_irregular_mask_test.zip in {datasets_dir}")
    jpegs = []
    for path in photos:
        buf = io.BytesIO()
        side = int(image_size * 1.15)      # a bit larger than the crop, as training images are
        Image.open(path).convert("RGB").resize((side, side)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    with zipfile.ZipFile(mask_zip) as zf:
        names = [name for name in sorted(zf.namelist()) if name.lower().endswith(masks.MASK_SUFFIXES)]
        pngs = [zf.read(name) for name in names[:len(jpegs)]]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for jpeg, png in zip(jpegs, pngs):
        img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)[:image_size, :image_size]
        _ = img / 255.0
        mask = masks.decode_mask(png, masks.NVIDIA_HOLE_COLOR)
        masks.augment_mask(mask, rng, image_size)
    return (time.perf_counter() - start) / len(jpegs) * 1e3


# ------------------------------------------------------------------------------------------------ report
def report(setup: TrainSetup, hw: Hardware, gpu_counts: Sequence[int], target: float) -> str:
    flops = step_flops(setup.image_size, setup.layer_size)
    params = sum(p for _, _, p in flops.per_layer_backward)
    vgg_one = sum(layer.flops for layer in vgg_layers(setup.image_size))
    g = 1e9
    lines = [
        f"PConv U-Net, layer_size {setup.layer_size}, {setup.image_size} px; VGG16 to pool3 on out/comp/gt",
        f"  per image: U-Net fwd {flops.unet_forward / g:.1f} + bwd {flops.unet_backward / g:.1f} GFLOP; "
        f"VGG fwd {flops.vgg_forward / g:.1f} (3 x {vgg_one / g:.1f}) + bwd {flops.vgg_backward / g:.1f} GFLOP; "
        f"Gram {(flops.gram_forward + flops.gram_backward) / g:.1f} GFLOP; total {flops.total / g:.0f} GFLOP",
        f"  per step and GPU (batch {setup.batch_per_gpu}): {setup.batch_per_gpu * flops.total / 1e12:.2f} TFLOP "
        f"at {hw.peak_tflops:g} TFLOP/s x {hw.mfu:.0%} = {hw.effective_flops / 1e12:.1f} TFLOP/s",
        f"  gradients: {params / 1e6:.2f} M parameters x {setup.grad_bytes} B = "
        f"{params * setup.grad_bytes / 2 ** 20:.1f} MiB per step, DDP buckets of {setup.bucket_mb:g} MiB",
        f"  node {hw.node.name}: {hw.node.gpus} GPU(s), {hw.node.vcpus} vCPU, {hw.node.network_gbit:g} Gbit/s "
        f"x {hw.net_efficiency:.0%}, NVLink bus {hw.bus_gbyte_s or 0:g} GB/s; data CPU "
        f"{setup.cpu_ms_per_sample:.1f} ms/sample",
        "",
        f"{'GPUs':>5} {'nodes':>5} {'step ms':>8} {'compute':>8} {'comm':>7} {'exposed':>8} {'data CPU':>9} "
        f"{'img/s':>7} {'effic.':>7} {'$/h':>7}",
    ]
    for n in gpu_counts:
        p = predict(n, setup, hw, flops)
        lines.append(f"{n:>5} {p.nodes:>5} {p.step_s * 1e3:>8.1f} {p.compute_s * 1e3:>8.1f} {p.comm_s * 1e3:>7.1f} "
                     f"{p.exposed_comm_s * 1e3:>8.1f} {p.data_cpu_load:>8.0%} {p.images_per_s:>7.1f} "
                     f"{p.efficiency:>7.1%} {p.nodes * hw.node.usd_per_hour:>7.2f}")
    lines += ["", f"Choices predicted to keep efficiency >= {target:.0%} (batch per GPU x bucket MiB x gradient bytes):"]
    for n in gpu_counts:
        if n == 1:
            continue
        hits = settings_for_efficiency(n, target, hw, setup)
        if not hits:
            lines.append(f"  {n:>3} GPUs: none in the searched grid (batch <= 16, buckets 5/25/100 MiB, fp32/fp16)")
            continue
        smallest = min(h.batch_per_gpu for h in hits)
        best = [h for h in hits if h.batch_per_gpu == smallest]
        desc = ", ".join(f"{h.bucket_mb:g} MiB/{'fp32' if h.grad_bytes == 4 else 'fp16'} ({h.efficiency:.0%})"
                         for h in best)
        lines.append(f"  {n:>3} GPUs: batch >= {smallest}/GPU (global {smallest * n}) with {desc}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d_setup, d_hw = TrainSetup(), Hardware()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 32, 64], help="GPU counts to predict")
    p.add_argument("--node-type", choices=sorted(NODE_TYPES), default=d_hw.node.name)
    p.add_argument("--image-size", type=int, default=d_setup.image_size)
    p.add_argument("--layer-size", type=int, default=d_setup.layer_size)
    p.add_argument("--batch-per-gpu", type=int, default=d_setup.batch_per_gpu)
    p.add_argument("--bucket-mb", type=float, default=d_setup.bucket_mb, help="DDP bucket_cap_mb")
    p.add_argument("--grad-bytes", type=int, choices=(2, 4), default=d_setup.grad_bytes,
                   help="4 = fp32 all-reduce (default DDP); 2 = fp16 compression hook")
    p.add_argument("--cpu-ms-per-sample", type=float, default=d_setup.cpu_ms_per_sample)
    p.add_argument("--peak-tflops", type=float, default=d_hw.peak_tflops)
    p.add_argument("--mfu", type=float, default=d_hw.mfu, help="utilisation of the peak over the whole step")
    p.add_argument("--nvlink-gbyte-s", type=float, default=None, help="intra-node all-reduce bus bandwidth")
    p.add_argument("--net-efficiency", type=float, default=d_hw.net_efficiency)
    p.add_argument("--measured-step-ms", type=float, default=None,
                   help="measured single-V100 step time at --batch-per-gpu; calibrates --mfu")
    p.add_argument("--measure-cpu", action="store_true",
                   help="time decode + mask augmentation here with ../shared/datasets (sets --cpu-ms-per-sample)")
    p.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    p.add_argument("--target", type=float, default=0.9, help="scaling efficiency to search settings for")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup = TrainSetup(args.image_size, args.layer_size, args.batch_per_gpu, args.bucket_mb, args.grad_bytes,
                       args.cpu_ms_per_sample)
    hw = Hardware(peak_tflops=args.peak_tflops, mfu=args.mfu, node=NODE_TYPES[args.node_type],
                  nvlink_gbyte_s=args.nvlink_gbyte_s, net_efficiency=args.net_efficiency)
    if args.measure_cpu:
        ms = measure_cpu_ms_per_sample(args.datasets, args.image_size)
        print(f"measured CPU per sample on this machine: {ms:.1f} ms (single thread)")
        setup = dataclasses.replace(setup, cpu_ms_per_sample=ms)
    if args.measured_step_ms is not None:
        mfu = calibrate_mfu(args.measured_step_ms, setup, hw)
        print(f"calibrated utilisation from a measured {args.measured_step_ms:g} ms step: {mfu:.1%} of peak")
        hw = dataclasses.replace(hw, mfu=mfu)
    print(report(setup, hw, args.gpus, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
