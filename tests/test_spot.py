"""Spot interruption notices (issue 26 item 4): the watcher reads EC2's ``spot/instance-action`` the IMDSv2 way (a
session token first) against a local stand-in of the metadata service, stops by itself where there is no metadata
service, keeps polling an endpoint that fails; the config refuses a bad URL; and a 2-worker training run on the
session Ray whose notice endpoint starts answering mid-run checkpoints at once, once, at one step on both ranks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

from pconv.core.config import ConfigError, TrainConfig
from pconv.train.spot import SpotNotice, SpotNoticeWatcher

NOTICE = {"action": "terminate", "time": "2026-12-07T12:00:00Z"}


class MetadataStandIn:
    """A local HTTP server answering as EC2's metadata service does for the spot path: ``PUT /latest/api/token``
    gives a token; ``GET /latest/meta-data/spot/instance-action`` needs it (401 without), then answers 404 until
    :meth:`has_notice` is true and the notice JSON after. ``plain``: no token needed (an ``http://`` notice URL).
    ``fail_first``: that many GETs answer 500 first."""

    def __init__(self, has_notice, plain: bool = False, fail_first: int = 0) -> None:
        self.has_notice, self.plain, self.fail_first = has_notice, plain, fail_first
        self.tokens = self.gets = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl:
                    return self._send(400)
                outer.tokens += 1
                self._send(200, b"tok-1")

            def do_GET(self) -> None:
                outer.gets += 1
                if outer.gets <= outer.fail_first:
                    return self._send(500)
                if not outer.plain and self.headers.get("X-aws-ec2-metadata-token") != "tok-1":
                    return self._send(401)
                if outer.has_notice():
                    return self._send(200, json.dumps(NOTICE).encode())
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_the_ec2_watcher_uses_an_imdsv2_token_and_sees_the_notice_when_it_comes():
    flag = threading.Event()
    imds = MetadataStandIn(flag.is_set)
    try:
        watcher = SpotNoticeWatcher("ec2", poll_s=0.05, imds=imds.url).start()
        assert wait_for(lambda: imds.gets >= 3)  # polled, answered 404: no notice
        assert not watcher.seen and watcher.failed_polls == 0
        flag.set()
        assert wait_for(lambda: watcher.seen)
        assert watcher.notice == SpotNotice("terminate", NOTICE["time"])
        assert imds.tokens == 1  # one session token for every poll
        gets = imds.gets
        time.sleep(0.3)
        assert imds.gets == gets  # a notice ends the watching
    finally:
        imds.close()


def test_without_a_metadata_service_the_ec2_watcher_stops_quietly(caplog):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.INFO, logger="pconv.train.spot"):
        watcher = SpotNoticeWatcher("ec2", poll_s=0.05, imds=closed).start()
        assert wait_for(lambda: not watcher._thread.is_alive())
    assert not watcher.seen and watcher.failed_polls == 1
    assert "no EC2 instance metadata service here" in caplog.text


def test_a_failing_notice_url_is_counted_and_polled_again(caplog):
    imds = MetadataStandIn(lambda: True, plain=True, fail_first=3)
    try:
        with caplog.at_level(logging.WARNING, logger="pconv.train.spot"):
            watcher = SpotNoticeWatcher(f"{imds.url}/latest/meta-data/spot/instance-action", poll_s=0.02).start()
            assert wait_for(lambda: watcher.seen)
        assert watcher.failed_polls == 3 and imds.tokens == 0
        assert "failed 1 time(s)" in caplog.text and "spot interruption notice: terminate" in caplog.text
    finally:
        imds.close()


@pytest.mark.parametrize("url", ["ec3", "169.254.169.254", "ftp://x"])
def test_the_config_refuses_a_notice_url_it_cannot_poll(url):
    with pytest.raises(ConfigError, match="spot_notice_url: `ec2`, an http"):
        TrainConfig(images="x", masks="y", spot_notice_url=url).validate()
    with pytest.raises(ConfigError, match="spot_notice_poll_s: must be > 0"):
        TrainConfig(images="x", masks="y", spot_notice_poll_s=0).validate()


@pytest.mark.slow
def test_a_notice_mid_run_makes_both_workers_checkpoint_at_once(prepared_shards, tmp_path, ray_local, monkeypatch):
    from fault_hooks import fault_hooks

    from pconv.tracking import checkpoints
    from pconv.train.driver import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    marker = tmp_path / "notice-now"
    endpoint = MetadataStandIn(marker.exists, plain=True)
    try:
        cfg = TrainConfig(images=prepared_shards["images"], masks=prepared_shards["masks"], image_size=32,
                          batch_size=4, workers=2, phase1_steps=12, phase2_steps=0, checkpoint_every=100,
                          val_every=100, sample_every=100, log_every=4, val_size=2, vgg_weights="random",
                          storage=str(tmp_path / "runs"), run_name="spot", register_as="",
                          spot_notice_url=f"{endpoint.url}/spot", spot_notice_poll_s=0.05)
        summary = run(cfg, step_hook=fault_hooks(notice={"step": 2, "marker": str(marker)}))
    finally:
        endpoint.close()
    assert summary.status == "finished" and summary.step == 12
    metas = {m["step"]: m for m in (json.loads(p.read_text()) for p in
                                    Path(tmp_path / "runs" / "spot").glob("checkpoint_*/meta.json"))}
    spot = [s for s, m in metas.items() if m["reason"] == "spot notice"]
    # one checkpoint for the notice (it keeps answering), after the step that raised it and before the end
    assert len(spot) == 1 and 2 < spot[0] < 12, metas
    assert metas[12]["reason"] == "final"
    assert len(metas[spot[0]]["data_position"]["rows"]) == 2  # both ranks' positions: a group checkpoint
    assert checkpoints.latest(str(tmp_path / "runs" / "spot"))[1]["step"] == 12
