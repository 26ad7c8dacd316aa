"""Typed training configuration: one flat dataclass, YAML <-> config, validation.

Every command-line flag of ``pipelines/train.py`` is a field here with the same name (dashes become
underscores), and a ``--config FILE.yaml`` holds the same keys; flags override the file. Defaults
reproduce the paper's setting (Liu et al., ECCV 2018, Sec. 4.1): 512 px, the 8-layer U-Net,
batch 6 per GPU, Adam at 2e-4 with BN (phase 1), then 5e-5 with encoder BN frozen (phase 2).

This module is part of the core: standard library and PyYAML only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

# Paper Sec. 4.1 ("Training procedure"): initial training with BN at lr 2e-4, fine-tuning with the
# encoder's BN frozen at lr 5e-5; batch size 6 on one V100 (Sec. 4.1, "Network training").
PAPER_LR_PHASE1 = 2e-4
PAPER_LR_PHASE2 = 5e-5
PAPER_BATCH_PER_GPU = 6
PAPER_IMAGE_SIZE = 512
MAX_LAYER_SIZE = 8  # the paper's U-Net has 8 encoder layers at 512 px (supplementary, Table 1)

AMP_CHOICES = ("auto", "fp16", "bf16", "off")


class ConfigError(ValueError):
    """A configuration that cannot run: raised before any cluster resources are taken."""


def default_layer_size(image_size: int) -> int:
    """Largest U-Net depth the image size allows (8 at 512, 7 at 256, ...), capped at the paper's 8.

    The bottleneck of an L-layer encoder is image_size / 2**L pixels; the paper's net stops at 2 px.
    """
    if image_size < 4 or image_size & (image_size - 1):
        raise ConfigError(f"image_size must be a power of two >= 4 to pick a layer size by default, got {image_size}; "
                          "pass --layer-size explicitly for other sizes")
    return min(MAX_LAYER_SIZE, int(math.log2(image_size)) - 1)


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names are the CLI flags (``--phase1-steps`` -> ``phase1_steps``)."""

    # --- data -------------------------------------------------------------------------------
    images: str = ""            # URI of image shards (a folder or s3:// prefix holding manifest.json)
    masks: str = ""             # URI of mask shards (same layout)
    image_size: int = PAPER_IMAGE_SIZE
    val_size: int = 8           # number of fixed (image, mask) validation pairs
    # --- run identity and outputs ------------------------------------------------------------
    run_name: str = "pconv"
    storage: str = "runs"       # where Ray Train keeps checkpoints: a local folder or s3:// prefix
    experiment: str = "pconv-inpainting"
    register_as: str | None = "pconv-unet"   # registered model name; empty/None = do not register
    # --- cluster -----------------------------------------------------------------------------
    workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs if the cluster has them
    cpus_per_worker: float | None = None  # None: 1 with GPUs, 0.5 on CPU-only clusters (leave CPUs to Ray Data)
    max_failures: int = 3
    # --- model -------------------------------------------------------------------------------
    layer_size: int | None = None  # None: default_layer_size(image_size)
    init_from: str | None = None   # checkpoint URI, local path or models:/NAME@ALIAS to start from
    # --- optimisation (two phases) -----------------------------------------------------------
    batch_size: int | None = None  # GLOBAL batch; None: PAPER_BATCH_PER_GPU x workers
    phase1_steps: int = 10_000
    phase2_steps: int = 5_000
    lr: float = PAPER_LR_PHASE1
    finetune_lr: float = PAPER_LR_PHASE2
    vgg_weights: str = "imagenet"  # imagenet | random | path / URI of a torchvision VGG16 state dict
    amp: str = "auto"              # auto: bf16 where supported, fp16 + GradScaler on V100, off on CPU
    max_nan_steps: int = 10        # consecutive non-finite losses tolerated before the run stops
    seed: int = 0
    # --- cadence -----------------------------------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 1_000
    num_to_keep: int = 3
    val_every: int = 1_000
    sample_every: int = 1_000

    # ------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in (what the run actually uses)."""
        out = dataclasses.replace(self)
        if out.layer_size is None:
            out.layer_size = default_layer_size(out.image_size)
        if out.batch_size is None:
            out.batch_size = PAPER_BATCH_PER_GPU * max(1, out.workers)
        if out.register_as == "":
            out.register_as = None
        return out

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
        if not cfg.masks:
            problems.append("masks: a mask shard URI is required (--masks)")
        if not cfg.run_name or "/" in cfg.run_name:
            problems.append(f"run_name: must be a non-empty name without '/', got {cfg.run_name!r}")
        if cfg.workers < 1:
            problems.append(f"workers: must be >= 1, got {cfg.workers}")
        if not 1 <= cfg.layer_size <= MAX_LAYER_SIZE:
            problems.append(f"layer_size: must be in 1..{MAX_LAYER_SIZE}, got {cfg.layer_size}")
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
        if cfg.amp not in AMP_CHOICES:
            problems.append(f"amp: must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
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
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; keys may use dashes or underscores; unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                unknown.append(str(raw_key))
                continue
            kwargs[key] = _coerce(known[key], value, source)
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

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "config.yaml") -> "TrainConfig":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys")
        return cls.from_dict(data, source=source)


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
    return TrainConfig.from_dict(data, source="command line")


__all__ = ["TrainConfig", "ConfigError", "default_layer_size", "merge", "AMP_CHOICES",
           "PAPER_LR_PHASE1", "PAPER_LR_PHASE2", "PAPER_BATCH_PER_GPU", "PAPER_IMAGE_SIZE", "MAX_LAYER_SIZE"]
