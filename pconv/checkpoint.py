"""The checkpoint directory contract shared by training, registration and inference.

A checkpoint is a directory holding:

- ``state.pt``   : ``{"model", "optimizer", "scaler", "step", "phase", "epoch", "data_seed"}``; the model state
                   dict is unwrapped (no DDP ``module.`` prefix) and everything loads with ``weights_only=True``;
- ``config.yaml``: the resolved :class:`~pconv.config.TrainConfig` as a flat mapping;
- ``meta.json``  : ``{"mlflow_run_id", "versions", ...}``.

A directory is *complete* only when all three exist; ``meta.json`` is written last, so a writer that dies
half-way leaves an incomplete directory that :func:`is_complete` rejects.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from pconv import storage

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def versions() -> dict[str, str]:
    """Package versions worth recording next to a model."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for pkg in ("torchvision", "ray", "mlflow", "pconv"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save(directory: str | Path, state: dict[str, Any], config_yaml: str, meta: dict[str, Any]) -> Path:
    """Write a complete checkpoint directory (each file atomically, ``meta.json`` last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(str(directory / STATE_FILE), buf.getvalue())
    storage.write_bytes_atomic(str(directory / CONFIG_FILE), config_yaml.encode())
    meta = {"versions": versions(), **meta}
    storage.write_bytes_atomic(str(directory / META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in (STATE_FILE, CONFIG_FILE, META_FILE))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` without executing pickled code (``weights_only=True``)."""
    directory = Path(directory)
    if not is_complete(directory):
        missing = [n for n in (STATE_FILE, CONFIG_FILE, META_FILE) if not (directory / n).is_file()]
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (missing {', '.join(missing)})")
    return torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)


def load_config_dict(directory: str | Path) -> dict[str, Any]:
    data = yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{directory}/{CONFIG_FILE} is not a mapping")
    return data


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def latest(root: str) -> tuple[str, dict[str, Any]] | None:
    """(URI, meta) of the COMPLETE checkpoint with the highest step under ``root`` (local or s3://), or None.

    Directories missing ``state.pt`` or ``config.yaml``, or whose ``meta.json`` does not parse, are skipped: a
    half-written checkpoint never becomes the latest.
    """
    try:
        metas = storage.list_files(root, suffixes=(META_FILE,))
    except FileNotFoundError:
        return None
    best: tuple[int, str, dict[str, Any]] | None = None
    for meta_uri in metas:
        base = meta_uri[: -len(META_FILE)].rstrip("/")
        if not all(storage.exists(storage.join(base, f)) for f in (STATE_FILE, CONFIG_FILE)):
            continue
        try:
            meta = json.loads(storage.read_bytes(meta_uri))
            step = int(meta.get("step") or 0)
        except (ValueError, TypeError, AttributeError):
            log.warning("skipping %s: unreadable meta.json", base)
            continue
        if best is None or step > best[0]:
            best = (step, base, meta)
    return (best[1], best[2]) if best else None
