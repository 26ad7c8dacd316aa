"""Typed training configuration: one flat dataclass, its YAML form, validation, and the description of every key.

Every command-line flag of ``pipelines/train.py`` is a field here with the same name (dashes become underscores),
and a ``--config FILE.yaml`` holds the same keys; flags override the file. Each field's ``metadata["help"]`` is
the one description of its key: the CLI's ``--help`` and the README's configuration table
(:func:`markdown_table`) are generated from it. Defaults reproduce the paper's setting (Liu et al., ECCV 2018,
Sec. 4.1): 512 px, the 8-layer U-Net, batch 6 per GPU, Adam at 2e-4 with BN (phase 1), then 5e-5 with encoder BN
frozen (phase 2). The U-Net depth rule and the paper's image size belong to :mod:`pconv.core.unet`.

This module is part of the core: no Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from pconv.core.layers import CONV_TYPES

from pconv.core.unet import PAPER_IMAGE_SIZE, PAPER_LAYER_SIZE, default_layer_size
from pconv.core.sr_grid import SR_SCALES, check_scale

# Paper Sec. 4.1 ("Training procedure"): initial training with BN at lr 2e-4, fine-tuning with the
# encoder's BN frozen at lr 5e-5; batch size 6 on one V100 (Sec. 4.1, "Network training").
PAPER_LR_PHASE1 = 2e-4
PAPER_LR_PHASE2 = 5e-5
PAPER_BATCH_PER_GPU = 6

AMP_CHOICES = ("auto", "fp16", "bf16", "off")
LR_SCALING_CHOICES = ("none", "linear", "sqrt")  # lr x (global batch / 6)^1, ^1/2, or as given
GRAD_COMPRESSION_CHOICES = ("none", "fp16")      # DDP gradient all-reduce in fp32 or fp16 (fp16_compress_hook)
TRAIN_EXPERIMENT = "pconv-inpainting"  # default MLflow experiment of training runs
SPOT_NOTICE_EC2 = "ec2"  # spot_notice_url: EC2's instance metadata service (pconv.train.spot)
REGISTER_AUTO = "auto"  # register_as: the task's default registered name (resolved by pconv.train.driver via the registry)
INPAINTING_TASK, SR_TASK = "inpainting", "sr"  # `task`: the paper's hole filling, or its Sec. 5 super-resolution
TASKS = (INPAINTING_TASK, SR_TASK)


class ConfigError(ValueError):
    """A configuration that cannot run: raised before any cluster resources are taken."""


def _key(default: Any, help: str, shown: str | None = None, choices: tuple | None = None,
         range_of: str | None = None) -> Any:
    """A config field: its default, its one description, (for ``None`` defaults) what the default means, the
    values it may take when they are a fixed set (the CLI offers them as ``choices``), and for an int that may be
    given as ``MIN-MAX`` the key that takes MIN (``range_of``; the CLI then takes the flag as text)."""
    return field(default=default, metadata={"help": help, **({"shown": shown} if shown else {}),
                                            **({"choices": choices} if choices else {}),
                                            **({"range_of": range_of} if range_of else {})})


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names are the CLI flags (``--phase1-steps`` -> ``phase1_steps``)."""

    # --- data -------------------------------------------------------------------------------
    images: str = _key("", "URI of the image shards (a folder or `s3://` prefix holding `manifest.json`), made by "
                           "`prepare_data.py images`; required")
    masks: str = _key("", "URI of the mask shards, made by `prepare_data.py masks`; required for `inpainting`, "
                          "not given for `sr`")
    task: str = _key(INPAINTING_TASK, "`inpainting` (holes from the mask shards) or `sr`: super-resolution as "
                                      "inpainting (paper Sec. 5): the crop downsampled by `sr_scale` (Pillow "
                                      "bicubic), its pixels on the HR grid, the rest holes; no mask shards", choices=TASKS)
    sr_scale: int = _key(4, f"upscaling factor K of `task: sr`, one of {', '.join(map(str, SR_SCALES))} "
                            "(`image_size` must be a multiple of it); ignored for inpainting", choices=SR_SCALES)
    image_size: int = _key(PAPER_IMAGE_SIZE, "training crop size in pixels (the paper's, Sec. 4.1)")
    val_size: int = _key(8, "number of fixed validation (image, mask) pairs for val metrics and sample grids")
    # --- run identity and outputs ------------------------------------------------------------
    run_name: str = _key("pconv", "name of this training run; with `storage` it identifies the run for resume")
    storage: str = _key("runs", "where checkpoints go: a local folder or `s3://` prefix")
    experiment: str = _key(TRAIN_EXPERIMENT, "MLflow experiment name")
    register_as: str | None = _key(REGISTER_AUTO, "registered model name of the final model; `auto`: the task's "
                                                  "default name (`pconv-unet` for inpainting, `pconv-sr` for sr); "
                                                  "`''`: do not register")
    lineage: bool = _key(False, "record which sample ids each worker consumed at every step, as Parquet files in "
                                "the MLflow run's `lineage/` (README: data lineage); a few KB per checkpoint")
    # --- cluster -----------------------------------------------------------------------------
    workers: int = _key(1, "number of data-parallel training workers (one GPU each when GPUs are used); `MIN-MAX` "
                           "(e.g. `2-8`, sets `min_workers` too): elastic, training goes on with the workers it can "
                           "get, at least MIN, and grows back to MAX when nodes return (README: spot nodes)",
                        range_of="min_workers")
    min_workers: int | None = _key(None, "the fewest workers an elastic run trains on (`--workers MIN-MAX`); "
                                         "`batch_size` is the global batch at `workers`, each worker keeps its "
                                         "share when fewer are up, and `lr_scaling` follows the batch trained",
                                   shown="`workers` (fixed)")
    elastic_resize_s: float = _key(60.0, "elastic runs: seconds between two looks for returned nodes to grow the "
                                         "group (Ray Train's `elastic_resize_monitor_interval_s`); growing restarts "
                                         "the group from the latest checkpoint")
    use_gpu: bool | None = _key(None, "train on GPUs; `auto`: if the cluster has GPUs or its autoscaler can launch "
                                      "GPU nodes", shown="auto")
    cpus_per_worker: float | None = _key(None, "CPUs reserved per worker; `auto`: 1 with GPUs, 0.5 on CPU-only "
                                               "clusters (leaving CPUs to Ray Data)", shown="auto")
    max_failures: int = _key(3, "worker-group restarts Ray Train may do before the run fails")
    spot_notice_url: str = _key(SPOT_NOTICE_EC2, "where a worker looks for its node's spot interruption notice, to "
                                                 "checkpoint at once (all ranks at the same step): `ec2` (instance "
                                                 "metadata, IMDSv2; off by itself where there is none), an "
                                                 "`http(s)://` URL answering as EC2's `spot/instance-action` does, or "
                                                 "`''` (off); see docs/operations.md")
    spot_notice_poll_s: float = _key(5.0, "seconds between two looks for a spot notice (AWS recommends 5)")
    # --- model -------------------------------------------------------------------------------
    layer_size: int | None = _key(None, "U-Net depth; by default the depth the image size allows "
                                        "(`pconv.core.unet.default_layer_size`: 8 at 512, 7 at 256 and 384, 6 at 128)", shown="from `image_size`")
    conv: str = _key("partial", "the U-Net's convolution: `partial` (the paper, eq. 1–2) or `gated` (gated convolution "
                                "of Yu et al. 2019 in the same U-Net and losses; not the full DeepFill v2, see "
                                "docs/variants.md)", choices=CONV_TYPES)
    init_from: str | None = _key(None, "start from these weights: checkpoint URI, local path or `models:/NAME@ALIAS`",
                                 shown="—")
    # --- optimisation (two phases) -----------------------------------------------------------
    batch_size: int | None = _key(None, "GLOBAL batch size, split evenly across workers; by default the "
                                        "paper's 6 per worker (Sec. 4.1)", shown=f"{PAPER_BATCH_PER_GPU} × workers")
    phase1_steps: int = _key(10_000, "steps of phase 1 (BN on, `lr`); 0 with `init_from` fine-tunes only")
    phase2_steps: int = _key(5_000, "steps of phase 2 (encoder BN frozen, `finetune_lr`)")
    lr: float = _key(PAPER_LR_PHASE1, "Adam learning rate of phase 1 (paper Sec. 4.1)")
    finetune_lr: float = _key(PAPER_LR_PHASE2, "Adam learning rate of phase 2 (paper Sec. 4.1)")
    vgg_weights: str = _key("imagenet", "VGG16 for the perceptual/style losses: `imagenet`, `random` (tests and "
                                        "demo only), or a path / URI of a torchvision VGG16 state dict")
    amp: str = _key("auto", "mixed precision: `auto` (bf16 on compute capability 8.0+ such as A100/H100, fp16 + "
                            "GradScaler below it: V100, T4; off on CPU), "
                            "`fp16`, `bf16` or `off`", choices=AMP_CHOICES)
    lr_scaling: str = _key("none", "scale `lr` and `finetune_lr` with the global batch relative to the paper's 6: "
                                   "`none` (the paper's values as given), `linear` (× batch/6) or `sqrt` "
                                   "(× √(batch/6)); see docs/scaling.md", choices=LR_SCALING_CHOICES)
    compile: bool = _key(False, "`torch.compile` the model and the loss (first steps are slower while it compiles); "
                                "eager by default")
    grad_compression: str = _key("none", "DDP gradient all-reduce: `none` (fp32) or `fp16` (16-bit gradients, half "
                                         "the bytes on the network: DDP's `fp16_compress_hook` with a GradScaler, i.e. "
                                         "amp fp16 on CUDA; else `bf16_compress_hook`, as unscaled gradients fall "
                                         "below fp16's range); see docs/scaling.md", choices=GRAD_COMPRESSION_CHOICES)
    ddp_bucket_mb: float | None = _key(None, "DDP gradient bucket size in MB (larger: fewer, bigger all-reduces)",
                                       shown="25 (DDP's)")
    max_nan_steps: int = _key(10, "consecutive non-finite losses tolerated (steps skipped) before the run stops")
    seed: int = _key(0, "seed for model init and data order")
    deterministic: bool = _key(False, "reproducible end to end: deterministic torch algorithms where they exist (no "
                                      "cuDNN autotuning); with the seeded init and data order, a resumed run ends "
                                      "with an uninterrupted run's weights (README: exact resume)")
    # --- cadence -----------------------------------------------------------------------------
    log_every: int = _key(10, "log training metrics every N steps")
    checkpoint_every: int = _key(1_000, "checkpoint every N steps (and at the end)")
    num_to_keep: int = _key(3, "checkpoints kept in storage")
    val_every: int = _key(1_000, "validate on the fixed pairs every N steps")
    sample_every: int = _key(1_000, "log the validation sample grid (masked | mask | output | composite | "
                                    "truth; sr: canvas | output | composite | truth) as MLflow image `samples` "
                                    "every N steps")

    # ------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in (what the run actually uses)."""
        out = dataclasses.replace(self)
        if out.layer_size is None:
            try:  # the model's own rule: the config accepts exactly the sizes build_model accepts
                out.layer_size = default_layer_size(out.image_size)
            except ValueError as exc:
                raise ConfigError(f"invalid training config: {exc}") from None
        if out.batch_size is None:
            out.batch_size = PAPER_BATCH_PER_GPU * max(1, out.workers)
        if out.register_as == "":
            out.register_as = None
        return out

    @property
    def elastic(self) -> bool:
        """True when the group may shrink below ``workers`` (``--workers MIN-MAX``)."""
        return self.min_workers is not None and self.min_workers < self.workers

    def global_batch(self, world: int | None = None) -> int:
        """The images of one optimiser step with ``world`` workers up (default: ``workers``). The global batch
        rule of elastic runs: each worker keeps its share of ``batch_size`` (:attr:`per_worker_batch`, what its
        GPU was sized for), so with fewer workers up a step sees fewer images; ``lr_scaling`` applies to this
        batch (:meth:`effective_lr`)."""
        cfg = self.resolved()
        return cfg.per_worker_batch * (world or cfg.workers)

    def effective_lr(self, phase: int, world: int | None = None) -> float:
        """The Adam learning rate a phase runs at with ``world`` workers up (default: ``workers``): ``lr`` /
        ``finetune_lr`` scaled by ``lr_scaling`` from the paper's batch of 6 (Sec. 4.1) to the global batch
        (:meth:`global_batch`)."""
        cfg = self.resolved()
        base = cfg.lr if phase == 1 else cfg.finetune_lr
        ratio = cfg.global_batch(world) / PAPER_BATCH_PER_GPU
        return base * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[cfg.lr_scaling]

    @property
    def per_worker_batch(self) -> int:
        cfg = self.resolved()
        return cfg.batch_size // max(1, cfg.workers)

    def validate(self) -> "TrainConfig":
        """Check everything that can be checked without touching the cluster; return the resolved config."""
        cfg = self.resolved()
        problems: list[str] = []
        if not cfg.images:
            problems.append("images: an image shard URI is required (--images)")
        if cfg.task not in TASKS:
            problems.append(f"task: must be one of {', '.join(TASKS)}, got {cfg.task!r}")
        elif cfg.task == SR_TASK:
            if cfg.masks:  # an error, not a warning: the run would silently train on something else than asked
                problems.append("masks: not used with task sr (the pairs are built from the image crops); drop --masks")
            try:
                check_scale(cfg.sr_scale)
                if cfg.image_size % cfg.sr_scale:
                    problems.append(f"image_size {cfg.image_size} is not a multiple of sr_scale {cfg.sr_scale}")
            except ValueError as exc:
                problems.append(f"sr_scale: {exc}")
        elif not cfg.masks:
            problems.append("masks: a mask shard URI is required (--masks)")
        if not cfg.run_name or "/" in cfg.run_name:
            problems.append(f"run_name: must be a non-empty name without '/', got {cfg.run_name!r}")
        if cfg.workers < 1:
            problems.append(f"workers: must be >= 1, got {cfg.workers}")
        elif cfg.min_workers is not None and not 1 <= cfg.min_workers <= cfg.workers:
            problems.append(f"workers {cfg.min_workers}-{cfg.workers}: MIN must be in 1..MAX")
        if not cfg.elastic_resize_s >= 0:
            problems.append(f"elastic_resize_s: must be >= 0, got {cfg.elastic_resize_s}")
        if not 1 <= cfg.layer_size <= PAPER_LAYER_SIZE:
            problems.append(f"layer_size: must be in 1..{PAPER_LAYER_SIZE}, got {cfg.layer_size}")
        elif cfg.image_size % (2 ** cfg.layer_size) or cfg.image_size < 2 ** cfg.layer_size:
            problems.append(f"image_size {cfg.image_size} is not divisible by 2**layer_size = {2 ** cfg.layer_size}; "
                            f"use an image size that is a multiple of {2 ** cfg.layer_size} or a smaller --layer-size")
        if cfg.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {cfg.batch_size}")
        elif cfg.workers >= 1 and cfg.batch_size % cfg.workers:
            problems.append(f"batch_size {cfg.batch_size} is not divisible across {cfg.workers} workers "
                            f"(the global batch is split evenly; try {cfg.workers * max(1, cfg.batch_size // cfg.workers)})")
        for name in ("phase1_steps", "phase2_steps", "max_failures"):
            if getattr(cfg, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
        if cfg.total_steps < 1:
            problems.append("phase1_steps + phase2_steps must be >= 1")
        if cfg.phase1_steps == 0 and not cfg.init_from:
            problems.append("phase1_steps is 0 (fine-tuning only) but no --init-from checkpoint/model was given")
        for name in ("log_every", "checkpoint_every", "val_every", "sample_every", "num_to_keep", "max_nan_steps", "val_size"):
            if getattr(cfg, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(cfg, name)}")
        for name in ("lr", "finetune_lr"):
            if not getattr(cfg, name) > 0:
                problems.append(f"{name}: must be > 0, got {getattr(cfg, name)}")
        if cfg.conv not in CONV_TYPES:
            problems.append(f"conv: must be one of {', '.join(CONV_TYPES)}, got {cfg.conv!r}")
        if cfg.amp not in AMP_CHOICES:
            problems.append(f"amp: must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
        for name, choices in (("lr_scaling", LR_SCALING_CHOICES), ("grad_compression", GRAD_COMPRESSION_CHOICES)):
            if getattr(cfg, name) not in choices:
                problems.append(f"{name}: must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
        if cfg.ddp_bucket_mb is not None and not cfg.ddp_bucket_mb > 0:
            problems.append(f"ddp_bucket_mb: must be > 0, got {cfg.ddp_bucket_mb}")
        if not (cfg.spot_notice_url in ("", SPOT_NOTICE_EC2) or cfg.spot_notice_url.startswith(("http://", "https://"))):
            problems.append(f"spot_notice_url: `{SPOT_NOTICE_EC2}`, an http(s):// URL or '' (off), got "
                            f"{cfg.spot_notice_url!r}")
        if not cfg.spot_notice_poll_s > 0:
            problems.append(f"spot_notice_poll_s: must be > 0, got {cfg.spot_notice_poll_s}")
        if cfg.cpus_per_worker is not None and not cfg.cpus_per_worker > 0:
            problems.append(f"cpus_per_worker: must be > 0, got {cfg.cpus_per_worker}")
        if not cfg.vgg_weights:
            problems.append("vgg_weights: say 'imagenet', 'random' or give a path/URI to a VGG16 state dict")
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
        return cfg

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; keys may use dashes or underscores; unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        ranges: dict[str, Any] = {}
        unknown = []
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                unknown.append(str(raw_key))
                continue
            range_of = known[key].metadata.get("range_of")
            if range_of and isinstance(value, str) and "-" in value.strip().lstrip("-"):
                low, _, value = value.strip().partition("-")
                ranges[range_of] = _coerce(known[range_of], low, source)
            kwargs[key] = _coerce(known[key], value, source)
        kwargs.update(ranges)  # `workers: MIN-MAX` wins over a `min_workers` key (merge() passes every key)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                              f"known keys: {', '.join(sorted(known))}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Coerce YAML scalars to the field's type, with a message naming the key on failure."""
    if value is None:
        return None
    type_name = str(f.type)
    try:
        if type_name.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if type_name.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        if type_name.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: key {f.name!r} expects {type_name}, got {value!r}") from None
    return value


def merge(base: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Apply overrides (e.g. command-line flags that were given) on top of a config."""
    data = base.to_dict()
    data.update({k: v for k, v in overrides.items()})
    if "workers" in overrides and "min_workers" not in overrides:
        data["min_workers"] = None  # `--workers N` over a file's MIN-MAX: fixed at N, as the flag says
    return TrainConfig.from_dict(data, source="command line")


def default_text(f: dataclasses.Field) -> str:
    """The default of a config key as people read it (``auto`` and ``—`` for the ``None``/empty defaults)."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if f.default in ("", None):
        return "—"
    if isinstance(f.default, float):
        mantissa, exponent = f"{f.default:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}" if abs(f.default) < 1e-3 else f"{f.default:g}"
    return f"`{f.default}`" if isinstance(f.default, str) else str(f.default)


def markdown_table() -> str:
    """The README's configuration reference (key | default | meaning), generated from the fields' metadata."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{f.name}` | {default_text(f)} | {f.metadata['help'].replace('|', chr(92) + '|')} |"
             for f in fields(TrainConfig)]
    return "\n".join(rows) + "\n"


__all__ = ["AMP_CHOICES", "ConfigError", "GRAD_COMPRESSION_CHOICES", "INPAINTING_TASK", "LR_SCALING_CHOICES",
           "PAPER_BATCH_PER_GPU", "PAPER_LR_PHASE1", "PAPER_LR_PHASE2", "SR_TASK", "TASKS",
           "REGISTER_AUTO", "TRAIN_EXPERIMENT", "TrainConfig", "default_text", "markdown_table", "merge"]
