"""A real HTTP fault proxy in front of the local S3 server (moto), for tests/test_s3_faults.py (issue 26 item 5).

:class:`S3FaultProxy` listens on 127.0.0.1 in a thread of the test process and forwards every request to the moto
endpoint, except that it answers ``503 SlowDown`` (S3's XML error body; no body for a HEAD) to ~10 % of requests
without forwarding them, and cuts ~1 % of the responses that have a body: the status line and headers go out (with
the full ``Content-Length``), then half of the body, then the connection is closed. Code under test reaches it like
any S3 endpoint, through :attr:`S3FaultProxy.env` (``AWS_ENDPOINT_URL`` = the proxy; Ray workers get it the way they
get the real endpoint) or :meth:`S3FaultProxy.environment` (``os.environ`` while entered).

Which requests fail is seeded: a request's fate is a hash of (seed, method, target, Range, how many times that
request came before), so it does not depend on the order in which concurrent clients arrive. Two rules keep a short
test meaningful and never flaky:

- every request is failed at most ``max_in_a_row`` (2) times in a row, so a client with a retry budget of 3+
  attempts (pconv's clients have 5) always gets through: a failure of the run is a bug, never bad luck;
- in each :meth:`stage`, the first request and the first response with a body of each client library
  (``botocore`` = boto3, ``aws-sdk-cpp`` = pyarrow's S3FileSystem) are failed (503, cut), so every stage meets
  both kinds of fault with both clients, whatever its request count (a stage makes tens of requests, where 1 %
  alone would often cut none).

Counts (per stage and per client): ``requests``, ``slowdown`` (503s sent), ``dropped`` (bodies cut), ``retried``
(failed requests that the client sent again), ``bytes`` (body bytes relayed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import http.client
import http.server
import logging
import socket
import threading
import uuid
from typing import Iterator
from urllib.parse import urlparse

import pytest

log = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
SLOWDOWN_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                "<Message>Please reduce your request rate.</Message><RequestId>{rid}</RequestId>"
                "<HostId>pconv-s3-fault-proxy</HostId></Error>")


def client_of(user_agent: str) -> str:
    """The client library a request came from, by its User-Agent."""
    ua = user_agent.lower()
    if "botocore" in ua or "boto3" in ua:
        return "botocore"
    if "aws-sdk-cpp" in ua or "arrow" in ua:
        return "pyarrow"
    return "other"


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the proxy answered: ``outcome`` is ``slowdown``, ``dropped`` or moto's HTTP status."""

    stage: str
    client: str
    method: str
    target: str  # path and query, as sent
    range: str
    outcome: str


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: "_Server"

    def log_message(self, format: str, *args) -> None:
        log.debug("s3 proxy: " + format, *args)

    def _read_body(self) -> bytes:
        """The request body exactly as sent (chunked framing kept: it is forwarded as is)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers (aws-chunked checksums) up to the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                                           timeout=120)
        return conn

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (0, 1):  # a keep-alive connection that moto closed meanwhile: once more on a new one
            conn = self._upstream()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in ("expect", "connection", "keep-alive", "proxy-connection"):
                        conn.putheader(name, value)
                conn.endheaders()
                if body:
                    conn.send(body)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                return resp.status, resp.reason, resp.getheaders(), data
            except (OSError, http.client.HTTPException):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, cut: bool) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP]
        if self.command == "HEAD":
            lines += [f"Content-Length: {v}" for k, v in headers if k.lower() == "content-length"]
        else:
            lines.append(f"Content-Length: {len(body)}")
        if self.close_connection or cut:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if self.command != "HEAD":
            self.wfile.write(body[: len(body) // 2] if cut else body)
        self.wfile.flush()
        if cut:  # the client has the headers and half the body: the connection goes away mid-body
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        body = self._read_body()
        srv = self.server
        client = client_of(self.headers.get("User-Agent", ""))
        key = (self.command, self.path, self.headers.get("Range", ""))
        slowdown = srv.decide(key, client, "slowdown")
        if slowdown:
            rid = uuid.uuid4().hex[:16].upper()
            xml = b"" if self.command == "HEAD" else SLOWDOWN_XML.format(rid=rid).encode()
            self._send(503, "Slow Down", [("Content-Type", "application/xml"), ("x-amz-request-id", rid),
                                          ("Content-Length", str(len(xml)))], xml, cut=False)
            srv.record(client, key, "slowdown")
            return
        status, reason, headers, data = self._forward(body)
        cut = bool(data) and self.command != "HEAD" and srv.decide(key, client, "dropped")
        srv.count(client, "bytes", len(data) // 2 if cut else len(data))
        self._send(status, reason, headers, data, cut)
        srv.record(client, key, "dropped" if cut else str(status))
        if not cut:
            srv.answered(key)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, upstream: str, slowdown_rate: float, drop_rate: float, seed: int, max_in_a_row: int,
                 first_faults: bool):
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.rates = {"slowdown": slowdown_rate, "dropped": drop_rate}
        self.seed, self.max_in_a_row, self.first_faults = seed, max_in_a_row, first_faults
        self.lock = threading.Lock()
        self.stage = "-"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.seen: collections.Counter = collections.Counter()          # key -> requests so far
        self.in_a_row: collections.Counter = collections.Counter()      # key -> faults since its last success
        self.forced: set[tuple[str, str, str]] = set()                  # (stage, client, kind) already forced
        self.log: list[Request] = []

    def count(self, client: str, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[self.stage][name] += n
            self.counts[self.stage][f"{name}.{client}"] += n

    def record(self, client: str, key: tuple[str, str, str], outcome: str) -> None:
        with self.lock:
            self.log.append(Request(self.stage, client, key[0], key[1], key[2], outcome))

    def decide(self, key: tuple[str, str, str], client: str, kind: str) -> bool:
        """Whether this request gets fault ``kind`` ("slowdown" is decided first, for every request; "dropped" for
        the forwarded ones with a body). Counts the request, its retry and the fault."""
        with self.lock:
            stage = self.counts[self.stage]
            if kind == "slowdown":
                n = self.seen[key]
                self.seen[key] += 1
                stage["requests"] += 1
                stage[f"requests.{client}"] += 1
                if self.in_a_row[key]:  # the last answer to this very request was a fault: this is its retry
                    stage["retried"] += 1
                    stage[f"retried.{client}"] += 1
            else:
                n = self.seen[key] - 1
            if self.in_a_row[key] >= self.max_in_a_row:
                hit = False
            elif self.first_faults and (self.stage, client, kind) not in self.forced:
                self.forced.add((self.stage, client, kind))
                hit = True
            else:
                digest = hashlib.sha256(repr((self.seed, kind, key, n)).encode()).digest()
                hit = int.from_bytes(digest[:8], "big") / 2.0**64 < self.rates[kind]
            if hit:
                self.in_a_row[key] += 1
                stage[kind] += 1
                stage[f"{kind}.{client}"] += 1
            return hit

    def answered(self, key: tuple[str, str, str]) -> None:
        """The request ``key`` got its whole answer: its run of faults ends."""
        with self.lock:
            self.in_a_row.pop(key, None)


class S3FaultProxy:
    """The fault proxy for ``upstream_env`` (a :class:`pconv.apps.local_s3.LocalS3`'s ``env``), as a context
    manager. ``env``: that environment with ``AWS_ENDPOINT_URL`` = the proxy. ``counts``: per stage (the names given
    to :meth:`stage`; ``"-"`` outside any), a Counter of the names in the module docstring, plus the same names
    suffixed ``.botocore`` / ``.pyarrow`` / ``.other`` per client. ``first_faults``: the first request and body of
    each client in each stage are failed (module docstring); False: only the rates decide."""

    def __init__(self, upstream_env: dict[str, str], *, slowdown_rate: float = 0.10, drop_rate: float = 0.01,
                 seed: int = 0, max_in_a_row: int = 2, first_faults: bool = True) -> None:
        self.upstream_env = dict(upstream_env)
        self._server = _Server(upstream_env["AWS_ENDPOINT_URL"], slowdown_rate, drop_rate, seed, max_in_a_row,
                               first_faults)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.env = {**self.upstream_env, "AWS_ENDPOINT_URL": self.endpoint}
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "S3FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def counts(self) -> dict[str, collections.Counter]:
        with self._server.lock:
            return {k: collections.Counter(v) for k, v in self._server.counts.items()}

    def requests(self, stage: str) -> list[Request]:
        """Every request of ``stage`` in the order they were answered."""
        with self._server.lock:
            return [r for r in self._server.log if r.stage == stage]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[collections.Counter]:
        """Count the requests from here on under ``name`` (its first request and first body of each client are
        failed, see the module docstring); yields that stage's live Counter."""
        with self._server.lock:
            previous, self._server.stage = self._server.stage, name
            live = self._server.counts[name]
        try:
            yield live
        finally:
            with self._server.lock:
                self._server.stage = previous

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """``os.environ`` points S3 clients at the proxy while entered (restored on exit)."""
        with pytest.MonkeyPatch.context() as env:
            for k, v in self.env.items():
                env.setenv(k, v)
            yield self.env
