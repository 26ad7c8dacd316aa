"""The checkpoint directory contract: its file names, writing, reading, and finding the latest complete one.

Training writes checkpoints; registration (:mod:`pconv.tracking.registry`) and model loading (:mod:`pconv.tracking.loading`) read
them. This module is the only place that knows the file names.

A checkpoint is a directory holding:

- ``state.pt``   : ``{"model", "optimizer", "scaler", "step", "phase", "epoch", "data_seed"}``; the model state
                   dict is unwrapped (no DDP ``module.`` prefix) and everything loads with ``weights_only=True``;
- ``config.yaml``: the resolved :class:`~pconv.core.config.TrainConfig` as a flat mapping;
- ``meta.json``  : ``{"mlflow_run_id", "versions", ...}``.

A directory is *complete* only when all three exist; ``meta.json`` is written last, so a writer that dies
half-way leaves an incomplete directory that :func:`is_complete` rejects.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from pconv.storage import uris
log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
CHECKPOINT_FILES = (STATE_FILE, CONFIG_FILE, META_FILE)  # a directory holding all three is complete
WRAPPER_PREFIX = "module."  # what DDP puts in front of every state-dict key


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
    uris.write_bytes_atomic(str(directory / STATE_FILE), buf.getvalue())
    uris.write_bytes_atomic(str(directory / CONFIG_FILE), config_yaml.encode())
    meta = {"versions": versions(), **meta}
    uris.write_bytes_atomic(str(directory / META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in CHECKPOINT_FILES)


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` without executing pickled code (``weights_only=True``)."""
    directory = Path(directory)
    if not is_complete(directory):
        missing = [n for n in CHECKPOINT_FILES if not (directory / n).is_file()]
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (missing {', '.join(missing)})")
    return torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)


def model_state(state: dict[str, Any], source: str) -> dict[str, Any]:
    """The model's state dict from a loaded ``state.pt``, keys without a DDP ``module.`` prefix."""
    if "model" not in state:
        raise ValueError(f"{source}: {STATE_FILE} has no 'model' entry")
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state["model"].items()}


def load_config_dict(directory: str | Path) -> dict[str, Any]:
    """``config.yaml`` of a local checkpoint (or of a logged model's files) as a mapping: the one config reader."""
    data = yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{directory}/{CONFIG_FILE} is not a mapping")
    return data


def load_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a local checkpoint."""
    return json.loads((Path(directory) / META_FILE).read_text())


def latest(root: str) -> tuple[str, dict[str, Any]] | None:
    """(URI, meta) of the COMPLETE checkpoint with the highest step under ``root`` (local or s3://), or None.

    Directories missing ``state.pt`` or ``config.yaml``, or whose ``meta.json`` does not parse, are skipped: a
    half-written checkpoint never becomes the latest.
    """
    try:
        metas = uris.list_files(root, suffixes=(META_FILE,))
    except FileNotFoundError:
        return None
    best: tuple[int, str, dict[str, Any]] | None = None
    for meta_uri in metas:
        base = meta_uri[: -len(META_FILE)].rstrip("/")
        if not all(uris.exists(uris.join(base, f)) for f in (STATE_FILE, CONFIG_FILE)):
            continue
        try:
            meta = json.loads(uris.read_bytes(meta_uri))
            step = int(meta.get("step") or 0)
        except (ValueError, TypeError, AttributeError):
            log.warning("skipping %s: unreadable meta.json", base)
            continue
        if best is None or step > best[0]:
            best = (step, base, meta)
    return (best[1], best[2]) if best else None


def resolve(uri: str) -> str | None:
    """The checkpoint ``uri`` (local or s3://) names: itself when complete, else the latest complete checkpoint
    under it (see :func:`latest`); None when there is none. A local file inside a checkpoint (e.g. its
    ``state.pt``) stands for its folder."""
    if uris.is_remote(uri):
        base = str(uri).rstrip("/")
        if all(uris.exists(uris.join(base, name)) for name in CHECKPOINT_FILES):
            return base
    else:
        path = Path(str(uri).removeprefix("file://")).expanduser()
        if path.is_file():
            path = path.parent
        if is_complete(path):
            return str(path)
        base = str(path)
    found = latest(base)
    return found[0] if found else None


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at ``uri``: the folder itself, or (s3://) a temporary download
    of its files, removed when the block ends."""
    if not uris.is_remote(uri):
        yield Path(str(uri).removeprefix("file://")).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="pconv-ckpt-") as tmp:
        for name in CHECKPOINT_FILES:
            (Path(tmp) / name).write_bytes(uris.read_bytes(uris.join(uri, name)))
        yield Path(tmp)
