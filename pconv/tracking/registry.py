"""The MLflow model registry: log a trained PConv U-Net (PyTorch flavour) as a registered version with an alias,
register a checkpoint, the registered names/aliases (the one list), and the logged model's file layout.

What gets logged, under the run's LoggedModel ``model`` (MLflow 3: ``name=`` replaces ``artifact_path=``):

- ``data/model.pt2``: the network exported with ``torch.export`` (MLflow's pickle-free ``pt2`` format), eval mode,
  signature ``image`` float32 N×3×S×S and ``mask`` float32 N×1×S×S (1 = valid) -> ``output``, ``output_mask``;
  the batch dimension is dynamic, the spatial size is the training size S (torch.export specialises it).
  Both tensors are passed as they are (a tuple input example): no 4-channel wrapper is needed.
- ``extra_files/state_dict.pt``: the plain state dict (loads with ``torch.load(weights_only=True)``) and
  ``extra_files/config.yaml`` (the resolved TrainConfig), so :func:`pconv.tracking.loading.load_model` rebuilds the net
  with ``build_model`` at ANY image size without executing pickles; ``extra_files/model_card.md``.
- model metadata: image size, layer size, mask polarity, training steps, paper citation.
- a pickle-free ``python_function`` flavour: loader module :data:`PYFUNC_LOADER` (``pconv.inference.pyfunc``) on
  ``extra_files/``, the ``pconv`` package in ``code/``; DataFrame of encoded image / mask files -> PNG composites
  (docs/serving.md). The loader lives in ``inference/`` because it runs the inpainting / SR code, which ``tracking``
  may not import: this module only writes its name. Versions logged before the package layout name
  ``pconv.pyfunc_model`` and carry that code in their own ``code/`` (see :mod:`pconv.inference.pyfunc`).

The version gets the alias ``candidate``; ``champion`` only moves through evaluation
(:func:`pconv.evaluation.inpainting.promote`). :func:`register_checkpoint` rebuilds the net from a checkpoint directory
(:mod:`pconv.tracking.checkpoints`) and logs it into the training run recorded there.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from pconv.tracking import checkpoints
from pconv.core.config import SR_TASK, TRAIN_EXPERIMENT, TrainConfig
from pconv.core.unet import build_model
from pconv.tracking.store import client_for, resolve_tracking_uri, start_or_resume_run

log = logging.getLogger(__name__)

# Registered model names and aliases: the one list (../shared/ARCHITECTURE.md, "Contracts").
INPAINTING_MODEL = "pconv-unet"    # default registered name of inpainting models
SR_MODEL = "pconv-sr"              # default registered name of super-resolution models
CANDIDATE = "candidate"            # every new version gets it
CHAMPION = "champion"              # moves only through evaluation (evaluate.py --promote champion)

MODEL_NAME = "model"               # the LoggedModel name inside the run
MODEL_TYPE = INPAINTING_MODEL      # the LoggedModel's model_type: the architecture, whatever it is registered as
STATE_DICT_FILE = "state_dict.pt"
MODEL_CARD_FILE = "model_card.md"
EXTRA_FILES_DIR = "extra_files"    # where mlflow.pytorch puts `extra_files`
MLMODEL_FILE = "MLmodel"           # MLflow's descriptor at the root of a model folder
FORMAT_TAG = "pconv-state-dict-v1"
PAPER = ("Guilin Liu, Fitsum A. Reda, Kevin J. Shih, Ting-Chun Wang, Andrew Tao, Bryan Catanzaro: "
         "Image Inpainting for Irregular Holes Using Partial Convolutions. ECCV 2018. arXiv:1804.07723")
MASK_POLARITY = "float mask, 1 = valid pixel, 0 = hole; N×1×H×W"


def _as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config), source="model config")
    return cfg.resolved()


def example_inputs(image_size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (image, mask) example; batch 2 so torch.export keeps the batch dimension dynamic."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, image_size, image_size, generator=gen)
    mask = torch.ones(batch, 1, image_size, image_size)
    q = max(1, image_size // 4)
    mask[:, :, q:3 * q, q:3 * q] = 0.0  # a square hole in the middle
    return image, mask


def model_card(cfg: TrainConfig, step: int | None, extra: Mapping[str, Any] | None = None) -> str:
    lines = [
        "# PConv U-Net (partial-convolution inpainting)",
        "",
        f"- paper: {PAPER}",
        f"- training image size: {cfg.image_size} px (square); runs on any size (padded to a multiple of "
        f"2**layer_size = {2 ** cfg.layer_size}, tiled when large)",
        f"- layer size (U-Net depth): {cfg.layer_size}; convolution: {cfg.conv} (`conv`, docs/variants.md)",
        f"- task: {cfg.task}" + (f" (x{cfg.sr_scale} super-resolution, paper Sec. 5)" if cfg.task == SR_TASK else ""),
        f"- mask polarity: {MASK_POLARITY}",
        "- inputs: image float32 N×3×H×W in [0, 1], mask float32 N×1×H×W; outputs: (output, output_mask); "
        "the inpainted result is the composite mask*image + (1-mask)*output",
        f"- training steps: {step if step is not None else 'unknown'} "
        f"(phase 1: {cfg.phase1_steps}, phase 2 fine-tuning: {cfg.phase2_steps})",
        f"- run name: {cfg.run_name}; training data: images={cfg.images or '?'} masks={cfg.masks or '?'}",
        f"- safe loading: {EXTRA_FILES_DIR}/{STATE_DICT_FILE} (torch.load weights_only=True) + "
        f"{EXTRA_FILES_DIR}/{checkpoints.CONFIG_FILE} -> pconv.core.unet.build_model(layer_size)",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by ``mlflow.pytorch.log_model``) at ``uri`` for the block only.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also export ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``
    into ``os.environ``; both the module state and the environment are put back exactly as they were, so a
    registration never pins later MLflow calls of the process to this URI.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_names}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for pkg in ("numpy", "pyyaml"):
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _signature(image: torch.Tensor, mask: torch.Tensor, outputs: tuple[torch.Tensor, ...]):
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(t: torch.Tensor, name: str) -> TensorSpec:
        return TensorSpec(np.dtype(np.float32), (-1, *t.shape[1:]), name)

    return ModelSignature(inputs=Schema([spec(image, "image"), spec(mask, "mask")]),
                          outputs=Schema([spec(outputs[0], "output"), spec(outputs[1], "output_mask")]))


_PT2_OK: set[tuple] = set()  # graph shapes whose round trip already succeeded in this process


def pt2_roundtrip_problem(net: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor,
                          expected: tuple[torch.Tensor, ...]) -> str | None:
    """Export ``net`` as MLflow's pt2 flavour does (dynamic batch), save, load back and compare outputs on the
    example. Returns None when the pickle-free form works, else what went wrong. A success is remembered per
    (class, layer size, input shape, torch version): whether a graph round-trips does not depend on weights."""
    from torch.export import Dim

    key = (type(net).__qualname__, getattr(net, "layer_size", None), tuple(image.shape[1:]), torch.__version__)
    if key in _PT2_OK:
        return None
    try:
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="pconv-pt2-") as tmp:
            auto = {0: Dim.AUTO}
            program = torch.export.export(net, (image, mask), dynamic_shapes=[auto, auto])
            path = Path(tmp) / "model.pt2"
            torch.export.save(program, str(path))
            loaded = torch.export.load(str(path)).module()
            got = loaded(image, mask)
    except Exception as exc:  # noqa: BLE001 - any export/serialisation failure means: do not rely on pt2
        return f"{type(exc).__name__}: {exc}"
    if not torch.allclose(got[0], expected[0], rtol=1e-4, atol=1e-5):
        return f"outputs differ after the round trip (max abs diff {(got[0] - expected[0]).abs().max():.3g})"
    _PT2_OK.add(key)
    return None


def _new_logged_model(client, run_id: str, cfg: TrainConfig) -> str:
    """Create the LoggedModel in the RUN's experiment.

    MLflow 3.17's ``log_model`` puts a new LoggedModel in the fluent API's current experiment (the Default
    experiment "0", with a relative ``./mlruns`` location for SQLite stores), not in the run's experiment,
    so the model id is created explicitly and handed to ``log_model(model_id=...)``.
    """
    exp_id = client.get_run(run_id).info.experiment_id
    params = {"image_size": str(cfg.image_size), "layer_size": str(cfg.layer_size), "run_name": cfg.run_name}
    return client.create_logged_model(experiment_id=exp_id, name=MODEL_NAME, source_run_id=run_id,
                                      params=params, model_type=MODEL_TYPE).model_id


# The pyfunc flavour's loader module, by name only (tracking may not import inference); shipped in the model's code/.
# Versions logged before the package layout (pconv 0.1.0) name "pconv.pyfunc_model", inside their own code/.
PYFUNC_LOADER = "pconv.inference.pyfunc"
CODE_DIR = "code"                  # where mlflow puts `code_paths` (the pconv package)


def _pyfunc_example(size: int = 32):
    """A one-row DataFrame (PNG photo, PNG mask with a white square hole): the pyfunc flavour's input example."""
    import io

    import pandas as pd
    from PIL import Image

    photo, hole = Image.new("RGB", (size, size), (120, 130, 140)), Image.new("L", (size, size), 0)
    hole.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    files = []
    for img in (photo, hole):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files.append(buf.getvalue())
    return pd.DataFrame({"image": [files[0]], "mask": [files[1]], "hole_color": ["white"]})


def _add_pyfunc_flavour(client, model_id: str, tracking_uri: str) -> None:
    """Give the logged model ``model_id`` a pickle-free ``python_function`` flavour (:mod:`pconv.inference.pyfunc`):
    loader module :data:`PYFUNC_LOADER` on ``extra_files/``, with the code in ``code/``; the model's signature
    and input example become the DataFrame contract (image, mask, optional hole_color -> image PNG bytes). The
    PyTorch flavour (pt2 + state dict) stays as it is; only MLmodel and the example files are rewritten."""
    import mlflow
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types.schema import ColSpec, Schema

    with tempfile.TemporaryDirectory(prefix="pconv-pyfunc-") as tmp:
        location = client.get_logged_model(model_id).artifact_location.rstrip("/")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{MLMODEL_FILE}", dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        model = Model.load(local)
        torch_conf = model.flavors.get("pytorch", {})
        model.flavors.pop("python_function", None)
        mlflow.pyfunc.add_to_model(model, loader_module=PYFUNC_LOADER, data=EXTRA_FILES_DIR,
                                   code=torch_conf.get("code") or CODE_DIR, conda_env="conda.yaml",
                                   python_env="python_env.yaml")
        model.signature = ModelSignature(
            inputs=Schema([ColSpec("binary", "image"), ColSpec("binary", "mask"),
                           ColSpec("string", "hole_color", required=False)]),
            outputs=Schema([ColSpec("binary", "image")]))
        out = Path(tmp) / "out"
        out.mkdir()
        _save_example(model, _pyfunc_example(), str(out))
        model.save(str(out / MLMODEL_FILE))
        client.log_model_artifacts(model_id, str(out))


def log_and_register_model(model: torch.nn.Module, config: TrainConfig | Mapping[str, Any], run_id: str | None,
                           name: str | None = INPAINTING_MODEL, alias: str | None = CANDIDATE,
                           checkpoint_dir: str | Path | None = None, tracking_uri: str | None = None,
                           step: int | None = None, checkpoint_uri: str | None = None) -> str | None:
    """Log ``model`` into run ``run_id`` and register it as ``name`` with ``alias``; returns the version.

    ``model`` may be wrapped (DDP / compile): it is unwrapped, copied to CPU in eval mode for export, and left
    untouched. ``run_id=None`` finds or creates the run named ``config.run_name`` in ``config.experiment``.
    ``checkpoint_dir`` (a local checkpoint) supplies the step count; ``checkpoint_uri`` is recorded as the
    version's source tag. With ``name`` empty the model is logged but not registered (returns None).
    Raises on failure: registration is an explicit request and must not fail silently.
    """
    import mlflow

    cfg = _as_config(config)
    uri = resolve_tracking_uri(tracking_uri)
    if checkpoint_dir is not None and step is None:
        step = checkpoints.load_meta(checkpoint_dir).get("step")
    if run_id is None:
        run_id = start_or_resume_run(cfg.experiment or TRAIN_EXPERIMENT, cfg.run_name, tracking_uri=uri)
        if run_id is None:
            raise RuntimeError(f"cannot register the model: the MLflow tracking server at {uri} is unreachable")

    client = client_for(uri)
    net = copy.deepcopy(checkpoints.unwrap(model)).to("cpu").float().eval()
    image, mask = example_inputs(cfg.image_size)
    with torch.no_grad():
        outputs = net(image, mask)
    signature = _signature(image, mask, outputs)
    metadata = {"image_size": cfg.image_size, "layer_size": cfg.layer_size, "conv": cfg.conv, "in_channels": 3,
                "task": cfg.task, "sr_scale": cfg.sr_scale if cfg.task == SR_TASK else None,
                "mask_polarity": MASK_POLARITY, "training_steps": step, "paper": PAPER,
                "pconv_format": FORMAT_TAG, "state_dict": f"{EXTRA_FILES_DIR}/{STATE_DICT_FILE}",
                "config": f"{EXTRA_FILES_DIR}/{checkpoints.CONFIG_FILE}",
                "versions": {k: str(v) for k, v in checkpoints.versions().items()}}

    with tempfile.TemporaryDirectory(prefix="pconv-register-") as tmp:
        files = {STATE_DICT_FILE: Path(tmp) / STATE_DICT_FILE, checkpoints.CONFIG_FILE: Path(tmp) / checkpoints.CONFIG_FILE,
                 MODEL_CARD_FILE: Path(tmp) / MODEL_CARD_FILE}
        torch.save(net.state_dict(), files[STATE_DICT_FILE])
        files[checkpoints.CONFIG_FILE].write_text(cfg.to_yaml())
        files[MODEL_CARD_FILE].write_text(model_card(cfg, step))
        common = dict(name=MODEL_NAME, run_id=run_id, input_example=(image, mask), signature=signature,
                      extra_files=[str(p) for p in files.values()], metadata=metadata,
                      code_paths=[str(Path(__file__).resolve().parents[1])],  # the pconv package, for the pyfunc
                      pip_requirements=_pip_requirements(), registered_model_name=name or None)
        problem = pt2_roundtrip_problem(net, image, mask, outputs)
        serialization = "pt2" if problem is None else "pickle"
        if problem:
            log.warning("the torch.export (pt2) form of the model does not round-trip (%s); logging MLflow's "
                        "pickle format instead. pconv.tracking.loading.load_model still loads the pickle-free state "
                        "dict.", problem)
        # Exported under no_grad: PartialConv's no_grad blocks would otherwise become set_grad_enabled wrapper
        # nodes that torch 2.14 saves but cannot load back ("Node.meta ... is missing val field").
        model_id = _new_logged_model(client, run_id, cfg)
        with _fluent_uri(uri), torch.no_grad():
            info = mlflow.pytorch.log_model(net, serialization_format=serialization, model_id=model_id, **common)
    _add_pyfunc_flavour(client, model_id, uri)

    client.log_text(run_id, model_card(cfg, step), MODEL_CARD_FILE)
    client.log_text(run_id, cfg.to_yaml(), checkpoints.CONFIG_FILE)
    client.set_tag(run_id, "pconv.model_uri", info.model_uri)
    if not name:
        log.info("logged model %s (not registered)", info.model_uri)
        return None
    version = str(info.registered_model_version)
    tags = {"pconv.image_size": cfg.image_size, "pconv.layer_size": cfg.layer_size, "pconv.conv": cfg.conv,
            "pconv.task": cfg.task, "pconv.sr_scale": cfg.sr_scale if cfg.task == SR_TASK else None,
            "pconv.step": step, "pconv.serialization": serialization, "pconv.run_name": cfg.run_name,
            "pconv.checkpoint": checkpoint_uri or (str(checkpoint_dir) if checkpoint_dir else None)}
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s (alias %s) from run %s", name, version, alias, run_id)
    return version


def register_checkpoint(checkpoint_uri: str, name: str = INPAINTING_MODEL, alias: str = CANDIDATE,
                        experiment: str | None = None, run_id: str | None = None,
                        tracking_uri: str | None = None) -> str | None:
    """Log a checkpoint's model to MLflow and register it (what ``pipelines/register.py`` does).

    ``checkpoint_uri`` is a checkpoint folder or s3:// prefix, or a folder holding checkpoints (the latest complete
    one is used). The MLflow run is ``run_id``, else the one recorded in the checkpoint's meta.json, else the run
    named after the checkpoint's ``run_name`` in ``experiment`` (created if needed). The run's status is left as
    it is.
    """
    source = checkpoints.resolve(checkpoint_uri)
    if source is None:
        raise FileNotFoundError(f"{checkpoint_uri}: no complete checkpoint ({' + '.join(checkpoints.CHECKPOINT_FILES)}) "
                                "there or under it; register.py takes a checkpoint folder or s3:// prefix")
    with checkpoints.local_copy(source) as directory:
        state, meta = checkpoints.load_state(directory), checkpoints.load_meta(directory)
        cfg = TrainConfig.from_dict(checkpoints.load_config_dict(directory),
                                    source=f"{source}/{checkpoints.CONFIG_FILE}").resolved()
    net = build_model(cfg.layer_size, conv=cfg.conv)
    try:
        net.load_state_dict(checkpoints.model_state(state, source))
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not fit a layer_size={cfg.layer_size} PConvUNet: {exc}") from exc
    rid = start_or_resume_run(experiment or cfg.experiment, cfg.run_name, run_id=run_id or meta.get("mlflow_run_id"),
                              tracking_uri=tracking_uri, mark_running=False)
    if rid is None:
        raise RuntimeError("the MLflow tracking server is unreachable; nothing was registered")
    return log_and_register_model(net.eval(), cfg, rid, name=name, alias=alias, tracking_uri=tracking_uri,
                                  step=state.get("step", meta.get("step")), checkpoint_uri=source)


# ---------------------------------------------------------------------------------------------
# Reading a logged model back (pconv.tracking.loading rebuilds the net from these files)
# ---------------------------------------------------------------------------------------------
def version_for_alias(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version number ``alias`` points at in registered model ``name``."""
    return str(client_for(tracking_uri).get_model_version_by_alias(name, alias).version)


def logged_model_id(name: str, version: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow 3 LoggedModel id behind a registered version (None for versions registered without one).

    MLflow 3.17 leaves ``ModelVersion.model_id`` empty for versions registered through ``log_model``; their
    ``source`` is then ``models:/<model id>``, which names the same LoggedModel."""
    mv = client_for(tracking_uri).get_model_version(name, version)
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(mv.source or "")
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def download_model_files(name: str, version: str, dst: str | Path, tracking_uri: str | None = None,
                         path: str = EXTRA_FILES_DIR) -> Path:
    """Download ``path`` of a registered version's model (default ``extra_files/``: state dict + config, no
    pickles) from the store ``tracking_uri`` into ``dst``; returns where it landed.

    The version is looked up with a client bound to that store, and its files are downloaded from the version's
    own location, not through a ``models:/NAME/VERSION/...`` URI: MLflow 3.17 resolves such a URI through the
    process-wide registry URI (``ModelsArtifactRepository._get_model_uri_infos`` ignores the ``registry_uri`` it
    is given), so a process whose ``MLFLOW_TRACKING_URI`` names another store (a Ray worker or Serve replica
    started with another environment) would look the version up there and not find it.
    """
    import mlflow

    resolved = resolve_tracking_uri(tracking_uri)
    location = client_for(resolved).get_model_version_download_uri(name, version).rstrip("/")
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{path}", dst_path=str(dst),
                                                tracking_uri=resolved)
    return Path(local)


def is_model_dir(directory: str | Path) -> bool:
    """True for a logged model folder (``MLmodel``) or its ``extra_files/`` (``state_dict.pt``)."""
    directory = Path(directory)
    return (directory / MLMODEL_FILE).is_file() or (directory / STATE_DICT_FILE).is_file()


def model_files_dir(directory: str | Path) -> Path:
    """The folder holding ``state_dict.pt`` + ``config.yaml`` of a logged model folder (or the folder itself)."""
    directory = Path(directory)
    extra = directory / EXTRA_FILES_DIR if (directory / EXTRA_FILES_DIR).is_dir() else directory
    if not (extra / STATE_DICT_FILE).is_file() or not (extra / checkpoints.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {EXTRA_FILES_DIR}/{STATE_DICT_FILE} + {checkpoints.CONFIG_FILE}; "
                                "was it logged by pconv.tracking.registry.log_and_register_model?")
    return extra
