"""Logging a trained PConv U-Net to MLflow (PyTorch flavour) and registering it with an alias.

What gets logged, under the run's LoggedModel ``model`` (MLflow 3: ``name=`` replaces ``artifact_path=``):

- ``data/model.pt2``: the network exported with ``torch.export`` (MLflow's pickle-free ``pt2`` format), eval mode,
  signature ``image`` float32 N×3×S×S and ``mask`` float32 N×1×S×S (1 = valid) -> ``output``, ``output_mask``;
  the batch dimension is dynamic, the spatial size is the training size S (torch.export specialises it).
  Both tensors are passed as they are (a tuple input example): no 4-channel wrapper is needed.
- ``extra_files/state_dict.pt``: the plain state dict (loads with ``torch.load(weights_only=True)``) and
  ``extra_files/config.yaml`` (the resolved TrainConfig), so :func:`pconv.inference.load_model` rebuilds the net
  with ``build_model`` at ANY image size without executing pickles; ``extra_files/model_card.md``.
- model metadata: image size, layer size, mask polarity, training steps, paper citation.

The version gets the alias ``candidate``; ``champion`` only moves through evaluation
(:func:`pconv.evaluation.promote`).
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

from pconv.config import TrainConfig
from pconv.tracking import DEFAULT_EXPERIMENT, client_for, resolve_tracking_uri, start_or_resume_run

log = logging.getLogger(__name__)

# Registered model names and aliases: the one list (../shared/ARCHITECTURE.md, "Contracts").
INPAINTING_MODEL = "pconv-unet"    # default registered name of inpainting models
SR_MODEL = "pconv-sr"              # default registered name of super-resolution models
CANDIDATE = "candidate"            # every new version gets it
CHAMPION = "champion"              # moves only through evaluation (evaluate.py --promote champion)

MODEL_NAME = "model"               # the LoggedModel name inside the run
STATE_DICT_FILE = "state_dict.pt"
CONFIG_FILE = "config.yaml"
MODEL_CARD_FILE = "model_card.md"
EXTRA_FILES_DIR = "extra_files"    # where mlflow.pytorch puts `extra_files`
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
        f"- layer size (U-Net depth): {cfg.layer_size}",
        f"- mask polarity: {MASK_POLARITY}",
        f"- inputs: image float32 N×3×H×W in [0, 1], mask float32 N×1×H×W; outputs: (output, output_mask); "
        "the inpainted result is the composite mask*image + (1-mask)*output",
        f"- training steps: {step if step is not None else 'unknown'} "
        f"(phase 1: {cfg.phase1_steps}, phase 2 fine-tuning: {cfg.phase2_steps})",
        f"- run name: {cfg.run_name}; training data: images={cfg.images or '?'} masks={cfg.masks or '?'}",
        f"- safe loading: {EXTRA_FILES_DIR}/{STATE_DICT_FILE} (torch.load weights_only=True) + "
        f"{EXTRA_FILES_DIR}/{CONFIG_FILE} -> pconv.model.build_model(layer_size)",
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
                                      params=params, model_type="pconv-unet").model_id


def log_and_register_model(model: torch.nn.Module, config: TrainConfig | Mapping[str, Any], run_id: str | None,
                           name: str | None = "pconv-unet", alias: str | None = "candidate",
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

    from pconv.checkpoint import load_meta, unwrap, versions

    cfg = _as_config(config)
    uri = resolve_tracking_uri(tracking_uri)
    if checkpoint_dir is not None and step is None:
        step = load_meta(checkpoint_dir).get("step")
    if run_id is None:
        run_id = start_or_resume_run(cfg.experiment or DEFAULT_EXPERIMENT, cfg.run_name, tracking_uri=uri)
        if run_id is None:
            raise RuntimeError(f"cannot register the model: the MLflow tracking server at {uri} is unreachable")

    client = client_for(uri)
    net = copy.deepcopy(unwrap(model)).to("cpu").float().eval()
    image, mask = example_inputs(cfg.image_size)
    with torch.no_grad():
        outputs = net(image, mask)
    signature = _signature(image, mask, outputs)
    metadata = {"image_size": cfg.image_size, "layer_size": cfg.layer_size, "in_channels": 3,
                "mask_polarity": MASK_POLARITY, "training_steps": step, "paper": PAPER,
                "pconv_format": FORMAT_TAG, "state_dict": f"{EXTRA_FILES_DIR}/{STATE_DICT_FILE}",
                "config": f"{EXTRA_FILES_DIR}/{CONFIG_FILE}",
                "versions": {k: str(v) for k, v in versions().items()}}

    with tempfile.TemporaryDirectory(prefix="pconv-register-") as tmp:
        files = {STATE_DICT_FILE: Path(tmp) / STATE_DICT_FILE, CONFIG_FILE: Path(tmp) / CONFIG_FILE,
                 MODEL_CARD_FILE: Path(tmp) / MODEL_CARD_FILE}
        torch.save(net.state_dict(), files[STATE_DICT_FILE])
        files[CONFIG_FILE].write_text(cfg.to_yaml())
        files[MODEL_CARD_FILE].write_text(model_card(cfg, step))
        common = dict(name=MODEL_NAME, run_id=run_id, input_example=(image, mask), signature=signature,
                      extra_files=[str(p) for p in files.values()], metadata=metadata,
                      pip_requirements=_pip_requirements(), registered_model_name=name or None)
        problem = pt2_roundtrip_problem(net, image, mask, outputs)
        serialization = "pt2" if problem is None else "pickle"
        if problem:
            log.warning("the torch.export (pt2) form of the model does not round-trip (%s); logging MLflow's "
                        "pickle format instead. pconv.inference.load_model still loads the pickle-free state "
                        "dict.", problem)
        # Exported under no_grad: PartialConv's no_grad blocks would otherwise become set_grad_enabled wrapper
        # nodes that torch 2.14 saves but cannot load back ("Node.meta ... is missing val field").
        with _fluent_uri(uri), torch.no_grad():
            info = mlflow.pytorch.log_model(net, serialization_format=serialization,
                                            model_id=_new_logged_model(client, run_id, cfg), **common)

    client.log_text(run_id, model_card(cfg, step), MODEL_CARD_FILE)
    client.log_text(run_id, cfg.to_yaml(), CONFIG_FILE)
    client.set_tag(run_id, "pconv.model_uri", info.model_uri)
    if not name:
        log.info("logged model %s (not registered)", info.model_uri)
        return None
    version = str(info.registered_model_version)
    tags = {"pconv.image_size": cfg.image_size, "pconv.layer_size": cfg.layer_size, "pconv.step": step,
            "pconv.serialization": serialization, "pconv.run_name": cfg.run_name,
            "pconv.checkpoint": checkpoint_uri or (str(checkpoint_dir) if checkpoint_dir else None)}
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s (alias %s) from run %s", name, version, alias, run_id)
    return version


def model_version_info(name: str, version: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Facts about a registered version (for reports): version, run id, source, tags, aliases."""
    mv = client_for(tracking_uri).get_model_version(name, version)
    return {"name": name, "version": mv.version, "run_id": mv.run_id, "source": mv.source,
            "tags": dict(mv.tags or {}), "aliases": list(getattr(mv, "aliases", []) or [])}


__all__ = ["CONFIG_FILE", "EXTRA_FILES_DIR", "MODEL_CARD_FILE", "MODEL_NAME", "STATE_DICT_FILE", "PAPER",
           "example_inputs", "log_and_register_model", "model_card", "model_version_info"]
