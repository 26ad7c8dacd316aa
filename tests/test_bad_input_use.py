"""Bad input at the USE side (issue 19): inpaint / evaluate / batch / train entry points and the model loader.

Each test drives a real entry point (``pipelines/*.py`` ``main()`` in-process, or the library call it makes) with a
broken or unusual input and asserts what the user sees: one clear line and exit 2 for refused input, skip + count +
list and exit 1 for a folder with some unreadable files, a warning with the hole ratio for a probably inverted
mask, lossless output, no password in logs, no stray ``mlflow.db``, and a failed training run marked FAILED.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port
from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture (the last test only)
from pconv.tracking import runs, store
from pconv.core.config import ConfigError, TrainConfig
from test_loading import save_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]


def pipeline(name: str):
    """The command module ``pconv.commands.<name>`` (what ``pipelines/<name>.py`` runs; ``main(argv)`` in-process)."""
    return importlib.import_module(f"pconv.commands.{name}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A complete checkpoint of the tiny net (layer_size 4, trained at 32 px)."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", tiny_model(), step=1)


def write_pair(img_dir: Path, mask_dir: Path, stem: str, size: int = 40, hole_fraction: float = 0.25,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB PNG and a WHITE = hole mask PNG whose top ``hole_fraction`` of rows are holes."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    holes = np.zeros((size, size), bool)
    holes[: int(round(size * hole_fraction))] = True
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(img_dir / f"{stem}.png")
    Image.fromarray((holes * 255).astype(np.uint8)).save(mask_dir / f"{stem}.png")
    return img, holes


def inpaint_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = pipeline("inpaint").main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# 4: lossless output, lossy only when asked
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif", ".bmp"])
def test_output_is_lossless_so_valid_pixels_are_exact_on_disk(model_dir, tmp_path, capsys, suffix):
    img, holes = write_pair(tmp_path / "in", tmp_path / "m", "a", size=37)
    out = tmp_path / f"filled{suffix}"
    code, _, err = inpaint_cli(capsys, "--model", str(model_dir), "--image", str(tmp_path / "in" / "a.png"),
                               "--mask", str(tmp_path / "m" / "a.png"), "--out", str(out), "--hole-color", "white")
    assert code == 0, err
    with Image.open(out) as f:  # really that format (not PNG bytes under another name), and lossless
        assert f.format == {".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".bmp": "BMP"}[suffix]
        written = np.asarray(f.convert("RGB"))
    np.testing.assert_array_equal(written[~holes], img[~holes])  # every valid pixel bit-exact in the FILE


def test_lossy_output_is_refused_unless_allowed(model_dir, tmp_path, capsys, caplog):
    img, holes = write_pair(tmp_path / "in", tmp_path / "m", "a")
    args = ["--model", str(model_dir), "--image", str(tmp_path / "in" / "a.png"), "--mask",
            str(tmp_path / "m" / "a.png"), "--hole-color", "white"]
    code, _, err = inpaint_cli(capsys, *args, "--out", str(tmp_path / "x.jpg"))
    assert code == 2 and "lossily" in err and "--allow-lossy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jpg").exists()
    code, _, err = inpaint_cli(capsys, *args, "--out", str(tmp_path / "x.gif"))
    assert code == 2 and "unknown output format" in err
    code, _, err = inpaint_cli(capsys, *args, "--out", str(tmp_path / "x.jpg"), "--allow-lossy")
    assert code == 0 and "JPEG output is lossy" in caplog.text  # written, with a warning
    assert np.asarray(Image.open(tmp_path / "x.jpg")).shape == img.shape


# ---------------------------------------------------------------------------------------------
# 3: a probably inverted mask gets a warning with its hole ratio
# ---------------------------------------------------------------------------------------------
def test_inverted_mask_polarity_is_warned_with_the_ratio(model_dir, tmp_path, capsys):
    write_pair(tmp_path / "in", tmp_path / "m", "a", size=40, hole_fraction=0.25)
    args = ["--model", str(model_dir), "--image", str(tmp_path / "in" / "a.png"), "--mask",
            str(tmp_path / "m" / "a.png"), "--out", str(tmp_path / "o.png")]
    code, _, err = inpaint_cli(capsys, *args, "--hole-color", "white")
    assert code == 0 and "polarity" not in err
    code, out, err = inpaint_cli(capsys, *args, "--hole-color", "black")  # the wrong flag: 75 % holes
    assert code == 0 and "75.0% holes" in out
    assert "warning:" in err and "75.0%" in err and "inverted" in err


def test_batch_actor_reports_hole_ratios_for_the_polarity_check(tmp_path):
    from pconv.inference.batch import InpaintActor
    from pconv.core.masks import polarity_warning

    for i in range(3):
        write_pair(tmp_path / "in", tmp_path / "m", f"p{i}", size=32, hole_fraction=0.25, seed=i)
    batch = {k: np.array([str(tmp_path / d / f"p{i}.png") for i in range(3)], dtype=object)
             for k, d in (("image", "in"), ("mask", "m"), ("out", "out"))}
    actor = InpaintActor(tiny_model().state_dict(), 4, "black", 0.5, False, 2048)  # the wrong hole colour
    result = actor(batch)
    assert list(result["status"]) == ["ok"] * 3
    np.testing.assert_allclose(result["hole_ratio"], 0.75)
    assert "3 of 3 masks" in polarity_warning(result["hole_ratio"])  # what batch_inpaint's summary carries


# ---------------------------------------------------------------------------------------------
# 7: registry misses, corrupt weights and decompression bombs are one line and exit 2
# ---------------------------------------------------------------------------------------------
def test_registry_misses_are_one_clear_line(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    MlflowClient(store, registry_uri=store).create_registered_model("pconv-unet")  # a model without versions
    write_pair(tmp_path / "in", tmp_path / "m", "a")
    args = ["--image", str(tmp_path / "in" / "a.png"), "--mask", str(tmp_path / "m" / "a.png"), "--out",
            str(tmp_path / "o.png"), "--hole-color", "white"]
    for uri in ("models:/nope@x", "models:/pconv-unet/99", "models:/pconv-unet@champion"):
        code, _, err = inpaint_cli(capsys, "--model", uri, *args)
        assert code == 2, (uri, err)
        ours = [line for line in err.splitlines() if " mlflow." not in line]  # MLflow's own INFO lines aside
        assert len(ours) == 1 and "Traceback" not in err, err
        assert ours[0].startswith(f"error: {uri}: no such registered model, alias or version in the MLflow store "
                                  f"{store}"), err


@pytest.mark.parametrize("garbage", [b"definitely not a torch file", b"PK\x03\x04truncated zip"])
def test_corrupt_state_pt_is_one_clear_line(model_dir, tmp_path, capsys, garbage):
    import shutil

    broken = tmp_path / "checkpoint_000001"
    shutil.copytree(model_dir, broken)
    (broken / "state.pt").write_bytes(garbage)
    write_pair(tmp_path / "in", tmp_path / "m", "a")
    code, _, err = inpaint_cli(capsys, "--model", str(broken), "--image", str(tmp_path / "in" / "a.png"), "--mask",
                               str(tmp_path / "m" / "a.png"), "--out", str(tmp_path / "o.png"), "--hole-color", "white")
    assert code == 2 and "state.pt: corrupt or not a torch weights file" in err and "Traceback" not in err


def test_decompression_bomb_mask_is_one_clear_line(model_dir, tmp_path, capsys, monkeypatch):
    write_pair(tmp_path / "in", tmp_path / "m", "a", size=20)
    Image.new("L", (120, 120), 255).save(tmp_path / "m" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 120 x 120 > 2 x limit: Pillow raises, not warns
    code, _, err = inpaint_cli(capsys, "--model", str(model_dir), "--image", str(tmp_path / "in" / "a.png"),
                               "--mask", str(tmp_path / "m" / "bomb.png"), "--out", str(tmp_path / "o.png"),
                               "--hole-color", "white")
    assert code == 2 and "bomb.png" in err and "pixels" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 8: folders skip, count and list broken files, then exit 1
# ---------------------------------------------------------------------------------------------
def test_folder_inpainting_skips_and_lists_broken_pairs(model_dir, tmp_path, capsys):
    good = {s: write_pair(tmp_path / "in", tmp_path / "m", s, seed=i) for i, s in enumerate(["a", "c"])}
    (tmp_path / "in" / "b.png").write_bytes(b"not an image")  # broken image, in the middle of the folder
    Image.new("L", (40, 40)).save(tmp_path / "m" / "b.png")
    write_pair(tmp_path / "in", tmp_path / "m", "d")
    Image.new("L", (10, 10)).save(tmp_path / "m" / "d.png")  # a mask of the wrong size
    code, out, err = inpaint_cli(capsys, "--model", str(model_dir), "--image", str(tmp_path / "in"), "--mask",
                                 str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--hole-color", "white")
    assert code == 1
    assert "skipped" in err and "b.png" in err and "d.png" in err and "2 of 4 written, 2 skipped" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    for stem, (img, holes) in good.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))[~holes], img[~holes])


def test_evaluation_skips_lists_and_exits_1_on_a_bad_mask(model_dir, tmp_path, capsys):
    for i in range(3):
        write_pair(tmp_path / "img", tmp_path / "masks", f"p{i}", size=32, hole_fraction=0.2 + 0.1 * i, seed=i)
    (tmp_path / "masks" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "img" / "zz_broken.png").write_bytes(b"")
    code = pipeline("evaluate").main(["--model", str(model_dir), "--images", str(tmp_path / "img"), "--masks",
                                      str(tmp_path / "masks"), "--hole-color", "white", "--image-size", "32",
                                      "--no-mlflow", "--no-baseline", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert "### Model" in out.out  # the evaluation ran on what was readable
    assert out.err.count("skipped ") == 2 and "zz_broken.png" in out.err and "2 unreadable file(s)" in out.err


# ---------------------------------------------------------------------------------------------
# 11: a models:/ URI without a tracking store says so and creates no mlflow.db
# ---------------------------------------------------------------------------------------------
def test_registry_uri_without_a_store_creates_no_db(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path / "in", tmp_path / "m", "a")
    code, _, err = inpaint_cli(capsys, "--model", "models:/pconv-unet@champion", "--image", "in/a.png", "--mask",
                               "m/a.png", "--out", "o.png", "--hole-color", "white")
    assert code == 2 and "MLFLOW_TRACKING_URI is unset" in err and "no registered models" in err
    assert str(tmp_path / "mlflow.db") in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------
# 12: credentials in a tracking URI never reach a log line
# ---------------------------------------------------------------------------------------------
def test_tracking_uri_credentials_are_redacted(caplog, monkeypatch):
    assert store.redact_uri("http://user:s3cret@host:5000/x") == "http://user:***@host:5000/x"
    assert store.redact_uri("see https://tok3n@host/api and s3://b/k") == "see https://***@host/api and s3://b/k"
    assert store.redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    dead = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.INFO)
    policy = store.RetryPolicy(attempts=1, initial_s=0.01, max_total_s=1, cooldown_s=0)
    assert store.start_or_resume_run("exp", "run", tracking_uri=dead, policy=policy) is None
    assert "WITHOUT tracking" in caplog.text and "alice:***@127.0.0.1" in caplog.text
    assert "s3cret" not in caplog.text and "s3cret" not in repr(runs.Tracker("r", dead))


# ---------------------------------------------------------------------------------------------
# 6: training inputs checked before the cluster is touched; a failed run ends FAILED
# ---------------------------------------------------------------------------------------------
def _manifest(root: Path, kind: str) -> str:
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": kind, "counts": {"train": 8}}))
    return str(root)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(images=_manifest(tmp_path / "imgs", "images"), masks=_manifest(tmp_path / "msks", "masks"),
                image_size=32, batch_size=2, phase1_steps=2, phase2_steps=0, vgg_weights="random",
                storage=str(tmp_path / "runs"), run_name="t", register_as="")
    base.update(kw)
    return TrainConfig(**base)


def test_training_inputs_are_checked_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from pconv.train import driver
    def no_cluster(*_a, **_k):
        raise AssertionError("the cluster was touched")

    monkeypatch.setattr(driver, "plan_cluster", no_cluster)
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="holds masks shards, not images; were --images and --masks swapped"):
        driver.run(TrainConfig(**{**cfg.to_dict(), "images": cfg.masks, "masks": cfg.images}))
    with pytest.raises(ConfigError, match="--vgg-weights .*nope.pth: no such file"):
        driver.run(TrainConfig(**{**cfg.to_dict(), "vgg_weights": str(tmp_path / "nope.pth")}))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    closed = f"http://127.0.0.1:{free_port()}"  # an unreachable proxy: no download is possible
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, closed)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="--vgg-weights imagenet: not in the torch hub cache"):
        driver.run(TrainConfig(**{**cfg.to_dict(), "vgg_weights": "imagenet"}))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")  # present in the cache: no network needed, the check passes
    driver.check_vgg_weights("imagenet")
    assert not ray.is_initialized()

    code = pipeline("train").main(["--images", cfg.masks, "--masks", cfg.images, "--vgg-weights", "random",
                                   "--storage", str(tmp_path / "runs")])
    assert code == 2


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_training_run_ends_failed_in_mlflow(prepared_shards, tmp_path, ray_local, mlflow_server,  # noqa: F811
                                                     monkeypatch):
    from mlflow import MlflowClient

    from fault_hooks import fault_hooks
    from pconv.train import driver
    from pconv.train.driver import run

    def status(run_name: str) -> str:
        client = MlflowClient(mlflow_server.url)
        exp = client.get_experiment_by_name("bad-input")
        runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
        return runs[0].info.status

    base = dict(images=prepared_shards["images"], masks=prepared_shards["masks"], image_size=32, batch_size=2,
                phase1_steps=2, phase2_steps=0, checkpoint_every=2, val_every=2, sample_every=2, val_size=2,
                vgg_weights="random", storage=str(tmp_path / "runs"), register_as="", experiment="bad-input")

    boom = fault_hooks(fail={"rank": 0, "step": 0, "message": "boom inside the worker"})  # the worker raises
    with pytest.raises(Exception, match="boom inside the worker"):
        run(TrainConfig(**base, run_name="worker-fails", max_failures=0), step_hook=boom)
    assert status("worker-fails") == "FAILED"

    def unwritable_storage(*_a, **_k):
        raise PermissionError("storage not writable")

    with monkeypatch.context() as m:  # a failure on the driver after the run started, before fit()
        m.setattr(driver, "_run_config", unwritable_storage)
        with pytest.raises(PermissionError, match="storage not writable"):
            run(TrainConfig(**base, run_name="driver-fails"))
    assert status("driver-fails") == "FAILED"  # was left RUNNING



def test_serve_request_warns_on_inverted_masks_and_orients_masks_like_images():
    """The HTTP / pyfunc edge: a mask that is mostly holes is served with a warning that gives the ratio, and a mask
    file with an EXIF rotation is compared with the image after orientation (both as the user sees them)."""
    import io as _io

    import numpy as _np
    from PIL import Image as _Image

    from pconv.inference.pyfunc import decode_request

    def png(img, exif=None) -> bytes:
        buf = _io.BytesIO()
        img.save(buf, format="PNG", **({"exif": exif} if exif is not None else {}))
        return buf.getvalue()

    photo = png(_Image.new("RGB", (48, 32), (100, 120, 140)))
    inverted = _np.full((32, 48), 255, _np.uint8)
    inverted[:4, :4] = 0                                    # white = hole: 99 % holes
    d = decode_request(photo, png(_Image.fromarray(inverted)), "white")
    assert d.warning and "99." in d.warning and "inverted" in d.warning
    normal = _np.zeros((32, 48), _np.uint8)
    normal[8:16, 8:24] = 255
    assert decode_request(photo, png(_Image.fromarray(normal)), "white").warning is None

    rotated = _Image.fromarray(normal.T.copy())            # stored 32 wide x 48 high, EXIF says rotate 90
    exif = _Image.Exif()
    exif[0x0112] = 6
    d = decode_request(photo, png(rotated, exif), "white")
    assert tuple(d.mask.shape[-2:]) == (32, 48)


def test_a_request_sent_packed_to_a_model_replica_unpacks_bit_for_bit(datasets_dir):
    """The Serve ingress sends each checked request to a model replica as uint8 (Decoded.pack: a quarter of the
    bytes); the replica's Decoded equals decode_request's bit for bit, on a real photo with an NVIDIA mask."""
    import io as _io
    import zipfile

    import numpy as _np
    from PIL import Image as _Image

    from pconv.inference.pyfunc import decode_request

    photo = sorted((datasets_dir / "celeba_hq_sample").glob("*.jpg"))[0].read_bytes()
    size = _Image.open(_io.BytesIO(photo)).size
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as z:
        name = sorted(n for n in z.namelist() if n.endswith(".png"))[100]
        mask = _Image.open(_io.BytesIO(z.read(name))).convert("L").resize(size, _Image.Resampling.NEAREST)
    buf = _io.BytesIO()
    _Image.fromarray(_np.where(_np.asarray(mask) >= 128, 255, 0).astype(_np.uint8)).save(buf, format="PNG")
    decoded = decode_request(photo, buf.getvalue(), "white")
    packed = decoded.pack()
    assert packed.image.dtype == torch.uint8 and packed.mask.dtype == torch.uint8
    assert packed.image.nbytes * 4 == decoded.image.nbytes
    back = packed.unpack()
    assert torch.equal(back.image, decoded.image) and torch.equal(back.mask, decoded.mask)
    assert back.warning == decoded.warning and 0 < float(back.mask.mean()) < 1
