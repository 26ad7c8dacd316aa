"""Model loading: any model URI -> ``(model, info)``: a PConv U-Net in eval mode on the requested device, and a
:class:`ModelInfo` saying what was loaded (size, depth, convolution, task, where it came from).

Model URIs (:func:`load_model`):

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered model. Only the plain state dict and config of
  the logged model (see :mod:`pconv.tracking.registry`) are downloaded; the net is rebuilt with ``build_model`` and the
  weights load with ``torch.load(weights_only=True)``: no pickle is executed.
- a checkpoint (see :mod:`pconv.tracking.checkpoints`): a local folder or ``s3://`` prefix; a folder of several
  checkpoints (e.g. a run's storage folder) resolves to its latest complete one (highest step).
- a local MLflow model folder (``MLmodel`` + ``extra_files/``) written by :mod:`pconv.tracking.registry`.

Training (``init_from``), evaluation, batch inference, serving and the CLIs all load through here.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from pconv.tracking import checkpoints as ckpt
from pconv.tracking import registry
from pconv.storage import uris
from pconv.core.config import INPAINTING_TASK, SR_TASK  # a config's `task` (absent: inpainting)
from pconv.core.unet import build_model, check_conv, conv_of_state_dict, default_layer_size
from pconv.tracking.store import redact_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    if not uri.startswith(REGISTRY_SCHEME):
        raise ValueError(f"{uri!r} is not a {REGISTRY_SCHEME} URI")
    rest = uri[len(REGISTRY_SCHEME):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    if not name or not version:
        raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version, None


def resolve_version(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """(name, version) of a registry URI, resolving an alias through the registry."""
    name, version, alias = parse_registry_uri(uri)
    if alias is not None:
        version = registry.version_for_alias(name, alias, tracking_uri)
    return name, str(version)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; ``cuda`` without a GPU is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


def _layer_size(cfg: dict[str, Any], source: str) -> tuple[int, int]:
    try:
        image_size = int(cfg["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{source}: {ckpt.CONFIG_FILE} has no usable image_size") from None
    layer_size = cfg.get("layer_size")
    return image_size, int(layer_size) if layer_size is not None else default_layer_size(image_size)


def from_state_dict(state_dict: dict[str, torch.Tensor], layer_size: int, source: str = "state dict",
                    conv: str | None = None) -> torch.nn.Module:
    """A ``layer_size`` U-Net (CPU, eval mode) holding ``state_dict``; ValueError when the weights do not fit.

    ``conv`` is the convolution variant (``partial`` / ``gated``, from the config); None: the one the weights are.
    """
    found = conv_of_state_dict(state_dict)
    try:
        conv = check_conv(conv or found or "partial")
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if found is not None and found != conv:
        raise ValueError(f"{source}: the config says conv={conv!r} but the weights are a {found!r} U-Net")
    model = build_model(layer_size, conv=conv)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not fit a layer_size={layer_size} conv={conv} U-Net: {exc}") from exc
    return model.eval()


ModelKind = Literal["checkpoint", "mlflow-model", "registry"]
CHECKPOINT_KIND: ModelKind = "checkpoint"      # a checkpoint folder / s3:// prefix (pconv.tracking.checkpoints)
MODEL_DIR_KIND: ModelKind = "mlflow-model"     # a local MLflow model folder written by pconv.tracking.registry
REGISTRY_KIND: ModelKind = "registry"          # a models:/NAME@ALIAS or models:/NAME/VERSION URI


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load_model` knows about the model it returns.

    The first group is the model itself (from its ``config.yaml``); the second says where it came from. Fields that
    a kind of source does not have are None (a checkpoint has no registry version, a registered version no step).
    """

    image_size: int            # the training crop size (px); the net runs on any size
    layer_size: int            # the U-Net's depth (pconv.core.unet.build_model)
    conv: str                  # the convolution variant: partial (the paper's) or gated
    task: str                  # INPAINTING_TASK or SR_TASK
    sr_scale: int | None       # K of a super-resolution model; None for inpainting (and an SR config without one)
    kind: ModelKind            # which kind of URI it was loaded from
    uri: str                   # the URI the caller asked for
    source: str                # where the weights were read: the checkpoint, the model folder or the registry URI
    step: int | None = None            # checkpoints: the training step
    mlflow_run_id: str | None = None   # checkpoints: the training run recorded in meta.json
    name: str | None = None            # registry: the registered model's name
    version: str | None = None         # registry: the version number (an alias resolved)
    model_id: str | None = None        # registry: the MLflow 3 LoggedModel behind the version (None if it has none)
    tracking_uri: str | None = None    # registry: the MLflow store, credentials redacted

    @property
    def label(self) -> str:
        """A short name of what is loaded: the registry version, else ``step-N`` of a checkpoint, else ``local``."""
        if self.version is not None:
            return str(self.version)
        if self.step is not None:
            return f"step-{self.step}"
        return "local"

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (JSON-ready: evaluation results, MLflow params)."""
        return asdict(self)


def _build(state_dict: dict[str, torch.Tensor], cfg: dict[str, Any], source: str,
           kind: ModelKind) -> tuple[torch.nn.Module, ModelInfo]:
    image_size, layer_size = _layer_size(cfg, source)
    conv = str(cfg.get("conv") or "partial")  # configs from before the variant existed are the paper's net
    model = from_state_dict(state_dict, layer_size, source, conv=conv)
    task, sr_scale = task_of_config(cfg)
    return model, ModelInfo(image_size=image_size, layer_size=layer_size, conv=conv, task=task, sr_scale=sr_scale,
                            kind=kind, uri=source, source=source)


def task_of_config(cfg: dict[str, Any]) -> tuple[str, int | None]:
    """``(task, sr_scale)`` of a config mapping (no ``task`` key: inpainting; ``sr_scale`` only for SR)."""
    task = str(cfg.get("task") or INPAINTING_TASK)
    return task, (int(cfg.get("sr_scale") or 0) or None if task == SR_TASK else None)


def check_task(info: ModelInfo, task: str) -> None:
    """ValueError naming the model when it was trained for another task than ``task`` (inpainting / sr)."""
    if info.task == task:
        return
    if info.task == SR_TASK:
        raise ValueError(f"{info.uri} is a super-resolution model (task: sr, scale {info.sr_scale}), not an "
                         "inpainting model; use it with pipelines/super_resolve.py (HTTP: POST /super-resolve)")
    raise ValueError(f"{info.uri} is a {info.task} model, not a super-resolution model; super-resolution needs a "
                     f"model trained with task: sr (pipelines/train.py --task sr), e.g. "
                     f"{REGISTRY_SCHEME}{registry.SR_MODEL}@{registry.CHAMPION}")


def model_config(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The config mapping of the model at ``uri`` WITHOUT loading its weights (only ``config.yaml`` is read);
    what a caller reads to dispatch on the model's ``task`` before the (slow) load."""
    uri = str(uri)
    if uri.startswith(REGISTRY_SCHEME):
        from mlflow.exceptions import MlflowException

        store = registry_store(uri, tracking_uri)
        try:
            name, version = resolve_version(uri, store)
            with tempfile.TemporaryDirectory(prefix="pconv-config-") as tmp:
                local = registry.download_model_files(name, version, tmp, store,
                                                      path=f"{registry.EXTRA_FILES_DIR}/{ckpt.CONFIG_FILE}")
                return ckpt.load_config_dict(local.parent)  # where MLflow put it (it keeps sub-paths)
        except MlflowException as exc:
            detail = redact_uri(str(getattr(exc, "message", exc))).splitlines()[0][:300]
            raise ValueError(f"{uri}: no such registered model, alias or version in the MLflow store "
                             f"{redact_uri(store)} ({detail})") from None
    base = ckpt.resolve(uri)
    if base is not None:
        with ckpt.local_copy(base) as directory:
            return ckpt.load_config_dict(directory)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not uris.is_remote(uri) and registry.is_model_dir(path):
        return ckpt.load_config_dict(registry.model_files_dir(path))
    raise FileNotFoundError(f"model {uri}: no checkpoint ({' + '.join(ckpt.CHECKPOINT_FILES)}) or MLflow model "
                            "folder there (expected models:/NAME@ALIAS, a checkpoint folder/s3:// prefix or an "
                            "MLflow model folder)")


def _read_torch(load: Callable[[], Any], what: str) -> dict[str, Any]:
    """Run a ``torch.load``: a corrupt, truncated or foreign file becomes a ValueError naming it."""
    try:
        state = load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(f"{what}: corrupt or not a torch weights file ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{what}: holds a {type(state).__name__}, expected a dict of tensors")
    return state


def _load_checkpoint_dir(directory: Path, source: str) -> tuple[torch.nn.Module, ModelInfo]:
    state = _read_torch(lambda: ckpt.load_state(directory), f"{source}/{ckpt.STATE_FILE}")
    model, info = _build(ckpt.model_state(state, source), ckpt.load_config_dict(directory), source, CHECKPOINT_KIND)
    meta = ckpt.load_meta(directory)
    step = state.get("step", meta.get("step"))
    return model, replace(info, step=None if step is None else int(step), mlflow_run_id=meta.get("mlflow_run_id"))


def _load_model_dir(directory: Path, source: str,
                    kind: ModelKind = MODEL_DIR_KIND) -> tuple[torch.nn.Module, ModelInfo]:
    """An MLflow model folder (or its extra_files/ subfolder) written by :mod:`pconv.tracking.registry`."""
    files = registry.model_files_dir(directory)
    state = _read_torch(lambda: torch.load(files / registry.STATE_DICT_FILE, map_location="cpu", weights_only=True),
                        f"{source}: {registry.STATE_DICT_FILE}")
    return _build(state, ckpt.load_config_dict(files), source, kind)


def _load_checkpoint(uri: str, missing: str) -> tuple[torch.nn.Module, ModelInfo]:
    """A checkpoint folder / s3:// prefix, or the latest complete checkpoint under it."""
    base = ckpt.resolve(uri)
    if base is None:
        raise FileNotFoundError(f"{uri}: {missing}")
    with ckpt.local_copy(base) as directory:
        return _load_checkpoint_dir(directory, base)


def registry_store(model_uri: str, tracking_uri: str | None = None) -> str:
    """The tracking URI a ``models:/`` lookup uses. A SQLite store whose file does not exist is refused (MLflow
    would silently create an empty database just to find nothing in it), saying which store that was."""
    store = resolve_tracking_uri(tracking_uri)
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        unset = not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        which = "MLFLOW_TRACKING_URI is unset, so the default store" if unset else "the tracking store"
        raise FileNotFoundError(f"{model_uri}: {which} {store} does not exist, so it has no registered models; "
                                "set MLFLOW_TRACKING_URI to the MLflow server (or sqlite:/// file) the model was "
                                "registered in, or pass a checkpoint folder / s3:// prefix")
    return store


def _from_registry(uri: str, tracking_uri: str | None) -> tuple[torch.nn.Module, ModelInfo]:
    from mlflow.exceptions import MlflowException

    store = registry_store(uri, tracking_uri)
    where = redact_uri(store)
    try:
        name, version = resolve_version(uri, store)
        with tempfile.TemporaryDirectory(prefix="pconv-model-") as tmp:
            local = registry.download_model_files(name, version, tmp, store)
            model, info = _load_model_dir(local, uri, REGISTRY_KIND)
        info = replace(info, name=name, version=version, tracking_uri=where,
                       model_id=registry.logged_model_id(name, version, store))
    except MlflowException as exc:
        missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        reason = "no such registered model, alias or version" if missing else "the registry lookup failed"
        detail = redact_uri(str(exc.message if hasattr(exc, "message") else exc)).splitlines()[0][:300]
        raise ValueError(f"{uri}: {reason} in the MLflow store {where} ({detail})") from None
    log.info("model %s is version %s of %r in the MLflow store %s", uri, info.version, info.name, where)
    return model, info


def load_model(uri: str, device: str | torch.device = "cpu", tracking_uri: str | None = None,
               task: str | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """Load a PConv U-Net (eval mode) from a registry URI, a checkpoint URI or a local path; with ``task``
    (inpainting / sr), a model trained for the other task is refused (:func:`check_task`).

    Returns ``(model, info)``, ``info`` a :class:`ModelInfo` (``uri`` is ``uri`` as given).
    """
    uri = str(uri)
    if uri.startswith(REGISTRY_SCHEME):
        model, info = _from_registry(uri, tracking_uri)
    elif uris.is_remote(uri):
        model, info = _load_checkpoint(uri, f"no complete checkpoint ({' + '.join(ckpt.CHECKPOINT_FILES)}) there")
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {uri}: no such file or directory (expected models:/NAME@ALIAS, a "
                                    "checkpoint folder/s3:// prefix or an MLflow model folder)")
        if path.is_file():
            path = path.parent
        if not ckpt.is_complete(path) and registry.is_model_dir(path):
            model, info = _load_model_dir(path, str(path))
        else:
            model, info = _load_checkpoint(str(path), f"neither a checkpoint ({' + '.join(ckpt.CHECKPOINT_FILES)}), "
                                                      "an MLflow model folder, nor a folder holding checkpoints")
    info = replace(info, uri=uri)
    if task is not None:
        check_task(info, task)
    return model.to(resolve_device(device)).eval(), info


__all__ = ["CHECKPOINT_KIND", "MODEL_DIR_KIND", "ModelInfo", "ModelKind", "REGISTRY_KIND", "check_task",
           "from_state_dict", "load_model", "model_config", "parse_registry_uri", "registry_store", "resolve_device",
           "resolve_version", "task_of_config"]
