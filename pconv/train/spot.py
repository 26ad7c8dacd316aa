"""Spot interruption notices: a training worker that sees its node's notice makes the whole group checkpoint at once.

EC2 gives a spot instance two minutes' notice before reclaiming it: the instance metadata path
``spot/instance-action`` answers 404 until then, and ``{"action": "terminate" | "stop" | "hibernate", "time":
"<UTC ISO 8601>"}`` from the notice on (AWS: "Spot Instance interruption notices"; AWS recommends polling it every
5 seconds). IMDSv2 needs a session token first (``PUT /latest/api/token``), as ray_cluster.yaml's
``HttpTokens: required`` enforces.

:class:`SpotNoticeWatcher` polls in a daemon thread; the loop reads :attr:`SpotNoticeWatcher.seen` once per step and
agrees with the other ranks (one all-reduce), so every rank reports the same checkpoint at the same step (a Ray Train
report is a barrier). When the node is then reclaimed, Ray Train restarts the group from that checkpoint and loses
at most the steps since the notice, not those since the last periodic checkpoint.

``spot_notice_url`` (TrainConfig): ``ec2`` polls the instance metadata service with IMDSv2; on a machine without one
(a laptop, another cloud, KubeRay pods without host metadata access) the first poll fails and watching stops, logged
once. An ``http(s)://`` URL is polled with a plain GET (tests, or a node agent that relays notices); ``''`` turns
watching off.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from pconv.core.config import SPOT_NOTICE_EC2

log = logging.getLogger(__name__)

IMDS = "http://169.254.169.254"
IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
IMDS_TOKEN_TTL_S = 21_600  # the longest AWS allows; one token serves the whole run
REQUEST_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SpotNotice:
    """An interruption notice: what EC2 will do to the instance and when (its ``time``, UTC)."""

    action: str
    time: str


class SpotNoticeWatcher:
    """Polls ``url`` every ``poll_s`` seconds in a daemon thread until a notice arrives (:attr:`seen`, :attr:`notice`)
    or :meth:`stop`. ``url``: ``ec2`` (IMDSv2 at ``imds``) or an ``http(s)://`` URL answering as the metadata path
    does (404 or 200 + JSON)."""

    def __init__(self, url: str, poll_s: float, imds: str = IMDS) -> None:
        self.url, self.poll_s, self.imds = url, poll_s, imds
        self.notice: SpotNotice | None = None
        self.failed_polls = 0
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spot-notice", daemon=True)

    @property
    def seen(self) -> bool:
        return self.notice is not None

    def start(self) -> SpotNoticeWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> SpotNotice | None:
        """One look at the notice path: the notice, or None (no notice yet). Raises OSError when the endpoint
        cannot be reached or answers something else than 200/404."""
        if self.url != SPOT_NOTICE_EC2:
            request = urllib.request.Request(self.url)
        else:
            if self._token is None:
                token_request = urllib.request.Request(
                    self.imds + IMDS_TOKEN_PATH, method="PUT",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL_S)})
                with urllib.request.urlopen(token_request, timeout=REQUEST_TIMEOUT_S) as resp:
                    self._token = resp.read().decode()
            request = urllib.request.Request(self.imds + IMDS_NOTICE_PATH,
                                             headers={"X-aws-ec2-metadata-token": self._token})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
                body = json.loads(resp.read().decode() or "{}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401 and self.url == SPOT_NOTICE_EC2:
                self._token = None  # expired: a new one next time
            raise
        return SpotNotice(str(body.get("action", "terminate")), str(body.get("time", "")))

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                notice = self.poll()
            except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; ValueError: bad JSON
                self.failed_polls += 1
                if self.url == SPOT_NOTICE_EC2 and self._token is None:
                    log.info("no EC2 instance metadata service here (%s): spot interruption notices are not watched",
                             e)
                    return
                if self.failed_polls in (1, 10, 100) or self.failed_polls % 1000 == 0:
                    log.warning("spot notice endpoint %s failed %d time(s), last: %s", self.url, self.failed_polls, e)
            else:
                if notice is not None:
                    self.notice = notice
                    log.warning("spot interruption notice: %s at %s", notice.action, notice.time or "(no time)")
                    return
            self._stop.wait(self.poll_s)


def start_watcher(url: str, poll_s: float) -> SpotNoticeWatcher | None:
    """A started watcher for ``spot_notice_url`` (``''``: None, watching is off)."""
    return SpotNoticeWatcher(url, poll_s).start() if url else None


__all__ = ["SpotNotice", "SpotNoticeWatcher", "start_watcher"]
