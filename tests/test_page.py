"""The serve page in a REAL headless Chromium (Debian's ``chromium`` + ``chromium-driver``, Selenium from PyPI)
against the Serve app on a REAL local Ray: open a photo, paint strokes on the canvas, press Inpaint, read the result
image back and check it against the photo (valid pixels kept, painted pixels filled). Saves docs/serve_page.png.
Starts Ray: run under the Ray lock (``flock /tmp/pconv-ray.lock``)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port
from pconv.tracking import checkpoints
from pconv.core.config import TrainConfig
from pconv.core.unet import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIDE = 384
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,820")


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        why = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs them, so CI must not skip the browser test")
        pytest.skip(why)
    return browser, driver


@pytest.fixture(scope="module")
def app_url(ray_local, tmp_path_factory):
    from ray import serve

    from pconv.inference.serve import APP_NAME, build_app

    torch.manual_seed(7)
    cfg = TrainConfig(images="x", masks="y", image_size=32, layer_size=4, run_name="page", phase1_steps=1,
                      phase2_steps=0)
    state = {"model": build_model(4).state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "phase": 1, "epoch": 0,
             "data_seed": 0}
    directory = checkpoints.save(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", state, cfg.to_yaml(), {"step": 1})
    port = free_port()
    try:  # on the session's local Ray (ray_local); the Serve instance is this module's
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(directory), min_replicas=1, max_replicas=1, num_cpus=0.5, device="cpu"),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _fetch_as_bytes(driver, expression: str) -> bytes:
    """The bytes behind a blob:/data: URL in the page (``expression`` evaluates to the URL)."""
    data_url = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch({expression}).then(r => r.blob()).then(b => {{ const f = new FileReader();"
        " f.onload = () => done(f.result); f.readAsDataURL(b); });")
    return base64.b64decode(data_url.split(",", 1)[1])


def test_paint_inpaint_and_compare_in_a_real_browser(app_url, browser, datasets_dir, tmp_path, repo_root):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    source = sorted((datasets_dir / "celeba_hq_sample").glob("*.jpg"))[0]
    photo = Image.open(source).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    photo_arr = np.asarray(photo)

    browser.get(app_url)
    wait = WebDriverWait(browser, 120)
    browser.find_element(By.ID, "file").send_keys(str(photo_path))
    canvas = wait.until(ec.visibility_of_element_located((By.ID, "view")))
    wait.until(lambda d: d.execute_script("return document.getElementById('view').width") == SIDE)
    browser.execute_script("document.getElementById('brush').value = 40;"
                           "document.getElementById('brush').dispatchEvent(new Event('input'));")
    rect = browser.execute_script("const r = document.getElementById('view').getBoundingClientRect();"
                                  "return [r.width, r.height];")
    w, h = rect
    for y in (0.3, 0.6):  # two horizontal strokes
        ActionChains(browser).move_to_element_with_offset(canvas, int(-0.3 * w), int((y - 0.5) * h)) \
            .click_and_hold().move_by_offset(int(0.2 * w), 5).move_by_offset(int(0.25 * w), -5).release().perform()
    ActionChains(browser).move_to_element_with_offset(canvas, int(0.25 * w), int(0.3 * h)).click().perform()
    browser.find_element(By.ID, "undo").click()  # undo the dot: two strokes remain
    assert browser.execute_script("return strokes.length") == 2
    browser.find_element(By.ID, "primary").click()
    wait.until(lambda d: d.execute_script("return document.getElementById('result').dataset.ready") == "1")
    assert "Done." in browser.find_element(By.ID, "status").text
    assert "model version step-1" in browser.find_element(By.ID, "version").text

    result = np.asarray(Image.open(io.BytesIO(_fetch_as_bytes(browser, "document.getElementById('result').src")))
                        .convert("RGB"))
    sent_mask = np.asarray(Image.open(io.BytesIO(_fetch_as_bytes(browser, "window.pconvLastMask"))).convert("L"))
    holes = sent_mask == 255
    assert result.shape == photo_arr.shape and sent_mask.shape == (SIDE, SIDE)
    assert 0.02 < holes.mean() < 0.5, f"painted fraction {holes.mean():.3f}"
    assert not holes[int(0.8 * SIDE):, :].any()          # nothing painted where no stroke went (below the strokes)
    assert np.array_equal(result[~holes], photo_arr[~holes])                # valid pixels kept
    filled = np.any(result[holes] != photo_arr[holes], axis=-1).mean()
    assert filled > 0.9, f"only {filled:.1%} of painted pixels were filled"
    time.sleep(0.3)
    shot = repo_root / "docs" / "serve_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
