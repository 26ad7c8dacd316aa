"""The pyfunc flavour every registered version carries (pconv.inference.pyfunc), through a REAL MLflow server:
``mlflow.pyfunc.load_model(models:/...@candidate).predict(df)`` returns the same composite as pconv.inference.inpaint,
a consumer without this repository loads it from the model's own code/, and a real ``mlflow models serve`` process
answers a JSON /invocations request."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import free_port, stop_process
from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture
from pconv.tracking import registry
from pconv.core.config import TrainConfig
from pconv.inference.inpaint import inpaint
from pconv.core.unet import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAYER_SIZE, IMAGE_SIZE = 4, 32
H, W = 70, 53  # not a multiple of the net's 16: padding is exercised too
URI = f"models:/{registry.INPAINTING_MODEL}@{registry.CANDIDATE}"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(mlflow_server):
    torch.manual_seed(3)
    model = build_model(LAYER_SIZE).eval()
    cfg = TrainConfig(images="x", masks="y", image_size=IMAGE_SIZE, layer_size=LAYER_SIZE, run_name="pyfunc",
                      experiment="pyfunc-exp", phase1_steps=1, phase2_steps=0)
    version = registry.log_and_register_model(model, cfg, None)
    rng = np.random.default_rng(0)
    photo = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    hole = np.zeros((H, W), np.uint8)
    hole[10:40, 5:30] = 255  # white = hole
    return {"model": model, "version": version, "photo": photo, "hole": hole}


def expected_composite(model, photo: np.ndarray, hole: np.ndarray) -> np.ndarray:
    image = torch.from_numpy(photo.transpose(2, 0, 1).astype(np.float32) / 255.0)
    comp = inpaint(model, image, torch.from_numpy((hole == 0).astype(np.float32))[None])
    return (comp.numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def test_pyfunc_round_trip_through_the_registry(registered, mlflow_server):
    import mlflow
    from mlflow.models import Model

    # Through the environment, restored afterwards: mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, and
    # set_tracking_uri(None) does not take it back, so later tests would talk to this (then stopped) server.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        env.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
        loaded = mlflow.pyfunc.load_model(URI)
        meta = loaded.metadata
    assert {"pytorch", "python_function"} <= set(meta.flavors)           # the PyTorch artifacts stay beside it
    assert meta.flavors["python_function"]["loader_module"] == "pconv.inference.pyfunc"
    assert [c.name for c in meta.get_input_schema().inputs] == ["image", "mask", "hole_color"]
    assert meta.saved_input_example_info is not None
    assert isinstance(meta, Model)

    photo, hole = registered["photo"], registered["hole"]
    df = pd.DataFrame({"image": [png(photo), base64.b64encode(png(photo)).decode()],
                       "mask": [png(hole), base64.b64encode(png(255 - hole)).decode()],
                       "hole_color": ["white", "black"]})
    out = loaded.predict(df)
    assert list(out.columns) == ["image"] and len(out) == 2
    want = expected_composite(registered["model"], photo, hole)
    for data in out["image"]:
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got.shape == photo.shape
        assert np.array_equal(got[hole == 0], photo[hole == 0])          # valid pixels unchanged
        assert np.array_equal(got, want)                                 # the same composite as pconv.inference.inpaint
    with pytest.raises(Exception, match="mask"):
        loaded.predict(pd.DataFrame({"image": [png(photo)], "mask": [png(np.zeros((5, 5), np.uint8))]}))


CONSUMER = """
import sys
sys.meta_path = [f for f in sys.meta_path if "pconv" not in repr(f) and "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
try:
    import pconv
    raise SystemExit("pconv importable without the model's code/: " + pconv.__file__)
except ModuleNotFoundError:
    pass
import io, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
import pconv
assert "/code/pconv/" in pconv.__file__, pconv.__file__
df = pd.DataFrame({{"image": [open({image!r}, "rb").read()], "mask": [open({mask!r}, "rb").read()]}})
open({out!r}, "wb").write(model.predict(df)["image"][0])
"""


def test_a_consumer_needs_neither_the_repo_nor_pip_install(registered, mlflow_server, tmp_path, repo_root):
    (tmp_path / "photo.png").write_bytes(png(registered["photo"]))
    (tmp_path / "mask.png").write_bytes(png(registered["hole"]))
    script = CONSUMER.format(repo=str(repo_root), uri=URI, image=str(tmp_path / "photo.png"),
                             mask=str(tmp_path / "mask.png"), out=str(tmp_path / "out.png"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert np.array_equal(got, expected_composite(registered["model"], registered["photo"], registered["hole"]))


def test_mlflow_models_serve_answers_json_invocations(registered, mlflow_server, tmp_path):
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    log_path = tmp_path / "models-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", URI, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)  # its uvicorn child dies with the group
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        photo, hole = registered["photo"], registered["hole"]
        body = {"dataframe_split": {"columns": ["image", "mask", "hole_color"],
                                    "data": [[base64.b64encode(png(photo)).decode(),
                                              base64.b64encode(png(hole)).decode(), "white"]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        encoded = answer["predictions"][0]["image"]
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
        assert np.array_equal(got, expected_composite(registered["model"], photo, hole))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        stop_process(proc, timeout=15)
