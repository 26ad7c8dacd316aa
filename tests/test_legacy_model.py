"""A model version registered BEFORE the package layout (pconv 0.1.0) still loads after it.

``tests/fixtures/model_v0_1_0/`` holds the artifacts of a real registered version, logged by the flat-module code
(tests/fixtures/README.md). Its pyfunc flavour names the old loader module ``pconv.pyfunc_model`` and ships the old
``pconv`` package in its ``code/`` folder; ``extra_files/`` holds the state dict and config.

- Through MLflow's pyfunc: ``mlflow.pyfunc.load_model`` (MLflow 3.17.2) prepends the model's ``code/`` to
  ``sys.path`` (``mlflow.utils.model_utils._add_code_to_system_path``) and imports the loader module; it evicts no
  module already imported. So it runs in a fresh interpreter (where the old code answers), and the old ``pconv``
  cannot leak into this process.
- Through :func:`pconv.tracking.loading.load_model`: the version registered into a fresh SQLite MLflow store (no
  server) and loaded by ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` (with the environment naming another
  store, as a Serve replica's may), and the local folder; both give exactly the net rebuilt by hand from the state
  dict.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pconv.core.unet import build_model
from pconv.inference.pyfunc import PConvPyfunc
from pconv.tracking import registry
from pconv.tracking.loading import load_model, model_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "model_v0_1_0"
OLD_LOADER = "pconv.pyfunc_model"
LAYER_SIZE, IMAGE_SIZE = 1, 8  # what the fixture was logged with (tests/fixtures/README.md)
H, W = 13, 21  # not a multiple of the net's 2**layer_size: the old and the new padding both run


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def request_files() -> dict[str, bytes]:
    """One inpainting request: a random photo and a white-on-black hole mask (white = hole, the default)."""
    rng = np.random.default_rng(11)
    hole = np.zeros((H, W), np.uint8)
    hole[3:9, 5:14] = 255
    return {"image": png((rng.random((H, W, 3)) * 255).astype(np.uint8)), "mask": png(hole)}


@pytest.fixture(scope="module")
def reference_net() -> torch.nn.Module:
    """The fixture's net rebuilt by hand: its plain state dict into the smallest U-Net the code builds."""
    state = torch.load(FIXTURE / registry.EXTRA_FILES_DIR / registry.STATE_DICT_FILE, map_location="cpu",
                       weights_only=True)
    net = build_model(LAYER_SIZE)
    net.load_state_dict(state)
    return net.eval()


def net_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """The raw outputs on two batches: the training size and a larger one (the net runs at any multiple)."""
    gen = torch.Generator().manual_seed(5)
    outs = []
    for size in (IMAGE_SIZE, 4 * IMAGE_SIZE):
        image = torch.rand(2, 3, size, size, generator=gen)
        mask = (torch.rand(2, 1, size, size, generator=gen) > 0.4).float()
        with torch.no_grad():
            outs.append(model(image, mask)[0])
    return outs


def test_the_fixture_is_an_old_version():
    """What the rest of this module relies on: the MLmodel names the old loader and ships the old code."""
    from mlflow.models import Model

    flavour = Model.load(str(FIXTURE / registry.MLMODEL_FILE)).flavors["python_function"]
    assert flavour["loader_module"] == OLD_LOADER != registry.PYFUNC_LOADER
    assert (FIXTURE / flavour["code"] / "pconv" / "pyfunc_model.py").is_file()
    assert not (Path(__file__).resolve().parents[1] / "pconv" / "pyfunc_model.py").exists()  # gone from the tree


OLD_PYFUNC = """
import sys
import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
import pconv  # noqa: E402 - which pconv answered: the model's own code/, not the installed package

assert pconv.__file__.startswith(sys.argv[1]), pconv.__file__
assert "pconv.pyfunc_model" in sys.modules and "pconv.inference.pyfunc" not in sys.modules
df = pd.DataFrame({"image": [open(sys.argv[2], "rb").read()], "mask": [open(sys.argv[3], "rb").read()]})
out = model.predict(df)
assert list(out.columns) == ["image"] and len(out) == 1, out
open(sys.argv[4], "wb").write(out["image"][0])
"""


def test_mlflow_pyfunc_loads_the_old_version_with_its_own_code(tmp_path, request_files, reference_net):
    """``mlflow.pyfunc.load_model(<old version folder>).predict(df)`` in a fresh interpreter that has today's pconv
    installed: MLflow imports the old loader from the model's code/, and the PNG it returns is the composite that
    today's code computes for the same version."""
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURE, model_dir)  # the interpreter may write bytecode next to the code it imports
    for name, data in request_files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # PYTHONPATH stays: the tier guard
    proc = subprocess.run([sys.executable, "-c", OLD_PYFUNC, str(model_dir), str(tmp_path / "image.png"),
                           str(tmp_path / "mask.png"), str(tmp_path / "out.png")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = (tmp_path / "out.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    photo = np.asarray(Image.open(io.BytesIO(request_files["image"])).convert("RGB"))
    valid = np.asarray(Image.open(io.BytesIO(request_files["mask"]))) == 0
    assert got.shape == photo.shape == (H, W, 3)
    assert np.array_equal(got[valid], photo[valid])  # valid pixels unchanged
    info = load_model(str(FIXTURE))[1]
    today = PConvPyfunc(reference_net, info).predict(pd.DataFrame([request_files]))["image"][0]
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(today)).convert("RGB")))  # old code == new code


def test_the_registry_names_a_loader_module_that_mlflow_can_call(request_files, reference_net):
    """New versions name ``pconv.inference.pyfunc``: it exists, has MLflow's entry point, and serves an old
    version's ``extra_files/`` too (the files, not the code, are the contract)."""
    loader = importlib.import_module(registry.PYFUNC_LOADER)
    assert loader.__name__ == registry.PYFUNC_LOADER == "pconv.inference.pyfunc"
    wrapped = loader._load_pyfunc(str(FIXTURE / registry.EXTRA_FILES_DIR), {"device": "cpu"})  # MLflow's call
    got = wrapped.predict(pd.DataFrame([request_files]))["image"][0]
    info = load_model(str(FIXTURE))[1]
    assert got == PConvPyfunc(reference_net, info).predict(pd.DataFrame([request_files]))["image"][0]


def register_fixture(tracking_uri: str, artifacts: Path, name: str, monkeypatch) -> tuple[str, str]:
    """The old version's artifacts as a LoggedModel of a fresh store, registered as version 1 of ``name`` (as
    ``log_model(registered_model_name=...)`` did when it was made); returns (version, model id)."""
    from mlflow import MlflowClient

    # MLflow 3.17's registry resolves a models:/<model id> source through the GLOBAL tracking URI, not the client's
    # (SqlAlchemyStore.create_model_version); unset, that is ./mlflow.db of the working dir.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment("legacy", artifact_location=artifacts.as_uri())
    run = client.create_run(experiment, run_name="legacy-0.1")
    logged = client.create_logged_model(experiment_id=experiment, name=registry.MODEL_NAME,
                                        source_run_id=run.info.run_id, model_type=registry.MODEL_TYPE)
    client.log_model_artifacts(logged.model_id, str(FIXTURE))
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run.info.run_id,
                                          model_id=logged.model_id)
    client.set_registered_model_alias(name, registry.CANDIDATE, version.version)
    return str(version.version), logged.model_id


def test_load_model_loads_the_old_version_from_the_registry_and_the_folder(tmp_path, reference_net, monkeypatch):
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version, model_id = register_fixture(tracking_uri, tmp_path / "artifacts", "pconv-legacy", monkeypatch)
    assert version == "1"
    want = net_outputs(reference_net)
    # The store is the one named, whatever the environment says: a Serve replica or Ray worker may run with an
    # MLFLOW_TRACKING_URI of another store (here an empty one), and MLflow resolves models:/ URIs through it.
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(elsewhere).search_experiments()  # creates it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    assert model_config("models:/pconv-legacy/1", tracking_uri)["layer_size"] == LAYER_SIZE

    for uri in ("models:/pconv-legacy/1", f"models:/pconv-legacy@{registry.CANDIDATE}"):
        model, info = load_model(uri, tracking_uri=tracking_uri)
        assert (info.kind, info.name, info.version, info.model_id) == ("registry", "pconv-legacy", "1", model_id)
        assert (info.layer_size, info.image_size, info.conv, info.task, info.sr_scale) == \
            (LAYER_SIZE, IMAGE_SIZE, "partial", "inpainting", None)
        assert info.uri == uri and not model.training
        assert all(torch.equal(g, w) for g, w in zip(net_outputs(model), want, strict=True)), uri

    for folder in (FIXTURE, FIXTURE / registry.EXTRA_FILES_DIR, FIXTURE / registry.MLMODEL_FILE):
        model, info = load_model(str(folder))
        assert (info.kind, info.layer_size, info.image_size, info.version) == ("mlflow-model", LAYER_SIZE,
                                                                                IMAGE_SIZE, None)
        assert all(torch.equal(g, w) for g, w in zip(net_outputs(model), want, strict=True)), folder
