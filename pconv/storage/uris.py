"""One URI vocabulary for local paths and S3-compatible object storage.

Every function takes either a local path (``/data/x``, ``relative/x``, ``file:///data/x``) or an ``s3://bucket/key``
URI. The S3 endpoint and credentials come **only** from the standard AWS environment, so the same code talks to AWS
S3 and to a local S3 server (moto, MinIO):

- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset on AWS);
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), or an instance profile / any other
  source of the default AWS credential chain;
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

Two clients are used: pyarrow's ``S3FileSystem`` (what Ray Data, Ray Train and Parquet readers want) and boto3 for
single-object operations (one ``PUT`` per object, so an object appears whole or not at all). Both are pointed at the
same endpoint, resolved once by :func:`s3_endpoint`.

Trap for callers that hand a filesystem to Ray (``read_parquet(..., filesystem=fs)``,
``RunConfig(storage_filesystem=)``): with an explicit filesystem the paths must carry **no** scheme (``bucket/key``,
not ``s3://bucket/key``); use :func:`get_filesystem` (one URI) or :func:`ray_paths` (several), which return exactly
that pair.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_SCHEMES = ("s3://", "s3a://")
# The standard AWS variables that say which endpoint, credentials and region S3 clients use: the one list. They
# are values, so other processes (e.g. Ray actors, see pconv.inference.batch) reach storage the same way when given
# them.
AWS_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
# Names a section of THIS machine's ~/.aws files: it selects clients here but is not forwarded elsewhere.
AWS_PROFILE_VAR = "AWS_PROFILE"


# ---------------------------------------------------------------------------------------------
# URI helpers
# ---------------------------------------------------------------------------------------------
def is_remote(uri: str) -> bool:
    """True for object-storage URIs (``s3://``), False for local paths and ``file://`` URIs."""
    return str(uri).startswith(S3_SCHEMES)


def _local_path(uri: str) -> Path:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return Path(uri).expanduser()


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); the key has no leading or trailing slash."""
    rest = str(uri).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: an s3:// URI needs a bucket name (s3://bucket/prefix)")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path components onto a local path or an ``s3://`` URI (always with ``/`` for S3)."""
    if is_remote(uri):
        out = str(uri).rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return str(_local_path(uri).joinpath(*[str(p) for p in parts]))


# ---------------------------------------------------------------------------------------------
# Clients (endpoint and credentials only from the standard environment)
# ---------------------------------------------------------------------------------------------
def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None (= AWS's regional endpoint)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_settings() -> tuple:
    """The S3 settings of the environment now (the AWS variables and the profile): the key of the cached clients,
    which are rebuilt when it changes (e.g. tests that switch servers)."""
    return tuple(os.environ.get(n) for n in (*AWS_ENV_VARS, AWS_PROFILE_VAR))


@functools.lru_cache(maxsize=8)
def _s3fs_cached(_key: tuple) -> "pyarrow.fs.S3FileSystem":
    from pyarrow import fs as pafs

    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
                    "connect_timeout": 10.0, "request_timeout": 60.0}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    region = s3_region()
    if region:
        kwargs["region"] = region
    # Credentials: pyarrow's default AWS chain (env vars, profile, instance profile) — never from code/config.
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> "pyarrow.fs.S3FileSystem":
    """A pyarrow S3 filesystem for the endpoint/credentials/region in the current environment."""
    return _s3fs_cached(s3_settings())


@functools.lru_cache(maxsize=8)
def _boto_cached(_key: tuple):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client("s3", endpoint_url=s3_endpoint(), region_name=s3_region(),
                          config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                        s3={"addressing_style": "path"} if s3_endpoint() else None))


def s3_client():
    """A boto3 S3 client for the endpoint/credentials/region in the current environment."""
    return _boto_cached(s3_settings())


def get_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """(pyarrow filesystem, path for that filesystem). For S3 the path is ``bucket/key`` WITHOUT a scheme."""
    from pyarrow import fs as pafs

    if is_remote(uri):
        bucket, key = _split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), str(_local_path(uri).resolve())


def ray_paths(uris: Iterable[str]) -> tuple["pyarrow.fs.FileSystem", list[str]]:
    """One filesystem and the scheme-less paths of several URIs (which must all be local or all on S3)."""
    uris = list(uris)
    if not uris:
        raise ValueError("ray_paths() needs at least one URI")
    kinds = {is_remote(u) for u in uris}
    if len(kinds) != 1:
        raise ValueError(f"cannot mix local paths and s3:// URIs in one read: {uris[:3]}...")
    fs, _ = get_filesystem(uris[0])
    return fs, [get_filesystem(u)[1] for u in uris]


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
    return False


# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------
#: GETs of one object by :func:`read_bytes` whose response body may break off before the object is read again.
#: botocore retries a request that fails before its response body (503 SlowDown, a refused or reset connection)
#: by itself, up to the client's ``max_attempts``, but not a body that breaks off while it is read: that
#: surfaces as ``ResponseStreamingError`` (S3 and its proxies do drop connections mid-body), so it is retried here.
BODY_READ_ATTEMPTS = 5


def _body_read_errors() -> tuple[type[Exception], ...]:
    """botocore's errors of a response body that breaks off while it is read (a connection closed or reset
    mid-body, fewer bytes than Content-Length, a read that times out)."""
    from botocore.exceptions import (ConnectionClosedError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)

    return ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError


def read_bytes(uri: str) -> bytes:
    """The whole content of one file/object. FileNotFoundError (naming the URI) when it does not exist.

    S3: a GET whose body breaks off is sent again, up to :data:`BODY_READ_ATTEMPTS` GETs in all (each retry
    logged); the object is always read whole from one response, never pieced together from several."""
    if not is_remote(uri):
        return _local_path(uri).read_bytes()
    bucket, key = _split_s3(uri)
    broken = _body_read_errors()
    for attempt in range(1, BODY_READ_ATTEMPTS + 1):
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - translate 404 only; everything else propagates
            if _is_not_found(exc):
                raise FileNotFoundError(f"{uri}: no such object") from exc
            raise
        try:
            return response["Body"].read()
        except broken as exc:
            if attempt == BODY_READ_ATTEMPTS:
                raise
            log.warning("%s: the response body broke off (%s: %s); GET %d of %d", uri, type(exc).__name__, exc,
                        attempt + 1, BODY_READ_ATTEMPTS)
        finally:
            response["Body"].close()
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


#: Ranged reads through pyarrow's S3 client (the AWS SDK for C++) that fail with one of these SDK error types are
#: sent again, up to :data:`BODY_READ_ATTEMPTS` reads in all (each retry logged, with a short back-off). The SDK
#: retries a 503 SlowDown by itself, except when it answers a *small* ranged read: it writes every response body,
#: an error's included, into a buffer of exactly the range's size, and the ~250-byte XML of a ``503 SlowDown``
#: overflows a read such as a zip's 22-byte end record. The SDK then reports ``INTERNAL_FAILURE: Failed to flush
#: response stream``, which it never retries (apache/doris#66557 describes the same mechanism in another SDK user);
#: a connection dropped mid-body surfaces as ``NETWORK_CONNECTION``. tests/test_s3_faults.py shows both.
SDK_TRANSIENT_ERRORS = ("INTERNAL_FAILURE", "NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "THROTTLING",
                        "REQUEST_TIMEOUT")
RETRY_BACKOFF_S = 0.2  # first back-off; doubled per retry (0.2, 0.4, 0.8, 1.6 s)


def is_transient_read_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a pyarrow S3 read error of one of :data:`SDK_TRANSIENT_ERRORS` (worth sending again)."""
    text = str(exc)
    return (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
            and any(f"AWS Error {kind}" in text for kind in SDK_TRANSIENT_ERRORS))


def retry_ranged_read(what: str, read: Callable[[], T]) -> T:
    """``read()`` (a pyarrow read of S3 data), sent again after a transient SDK error (:data:`SDK_TRANSIENT_ERRORS`),
    up to :data:`BODY_READ_ATTEMPTS` times in all; ``what`` names the object in the log and in the last error."""
    for attempt in range(1, BODY_READ_ATTEMPTS + 1):
        try:
            return read()
        except OSError as exc:
            if attempt == BODY_READ_ATTEMPTS or not is_transient_read_error(exc):
                raise
            log.warning("%s: ranged read failed (%s); read %d of %d", what, exc, attempt + 1, BODY_READ_ATTEMPTS)
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


class RangedFile:
    """A read-only, seekable file object over one S3 object (or local file) whose every read is one ranged GET,
    sent again on a transient error (:func:`retry_ranged_read`), and checked for length: a read returns exactly
    ``min(n, size - position)`` bytes or raises, never a short piece. What :mod:`zipfile` reads an S3 zip through
    (:func:`open_ranged`)."""

    def __init__(self, uri: str):
        fs, path = get_filesystem(uri)
        self.uri = uri
        self._file = retry_ranged_read(uri, lambda: fs.open_input_file(path))
        self.size = self._file.size()
        self._pos = 0

    def read_at(self, nbytes: int, offset: int) -> bytes:
        want = max(0, min(nbytes, self.size - offset))
        data = retry_ranged_read(self.uri, lambda: self._file.read_at(want, offset)) if want else b""
        if len(data) != want:
            raise OSError(f"{self.uri}: read {len(data)} bytes at {offset}, expected {want} (object of {self.size})")
        return bytes(data)

    def read(self, nbytes: int = -1) -> bytes:
        data = self.read_at(self.size - self._pos if nbytes is None or nbytes < 0 else nbytes, self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"{self.uri}: seek to {base + offset}, before the start")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RangedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_ranged(uri: str) -> RangedFile:
    """A :class:`RangedFile` of ``uri`` (S3 or local): random access by ranged reads that survive S3's transient
    errors. FileNotFoundError when it does not exist."""
    return RangedFile(uri)


def _umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``); elsewhere set-and-restore under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_umask_lock = threading.Lock()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old content or the whole new one, never a partial file.

    Local: a temporary file in the same directory, fsync, then ``os.replace``; the file gets the mode a plain
    ``open(path, "w")`` would give (``0o666`` minus the umask; ``mkstemp`` alone would leave it ``0o600``, unreadable
    for the other users of a shared dataset). S3: a single ``PUT``.
    """
    if is_remote(uri):
        bucket, key = _split_s3(uri)
        if not key:
            raise ValueError(f"{uri}: cannot write an object without a key")
        s3_client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return
    path = _local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_writable(uri: str) -> None:
    """Create a local directory if needed, then write and remove a probe file/object under ``uri``. OSError naming
    ``uri`` when it cannot be written (a local file in the way, permissions, a missing bucket, an endpoint down)."""
    if not is_remote(uri) and _local_path(uri).exists() and not _local_path(uri).is_dir():
        raise NotADirectoryError(f"destination {uri} exists and is not a directory")
    probe = join(uri, f".pconv-write-probe-{os.urandom(4).hex()}")
    try:
        makedirs(uri)
        write_bytes_atomic(probe, b"")
        delete(probe)
    except Exception as exc:  # noqa: BLE001 - permission, missing bucket, endpoint down ...
        raise PermissionError(f"destination {uri} is not writable: {type(exc).__name__}: {exc}") from exc


def exists(uri: str) -> bool:
    """True if a file/object exists at ``uri``, or (S3) any object lies under the prefix ``uri/``."""
    if not is_remote(uri):
        return _local_path(uri).exists()
    bucket, key = _split_s3(uri)
    client = s3_client()
    if key:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if not _is_not_found(exc):
                raise
    prefix = f"{key}/" if key else ""
    try:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001
        if _is_not_found(exc):
            return False
        raise
    return resp.get("KeyCount", 0) > 0


def delete(uri: str) -> None:
    """Remove one file/object; missing is not an error."""
    if is_remote(uri):
        bucket, key = _split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        _local_path(uri).unlink()
    except FileNotFoundError:
        pass


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs of the same kind, sorted. Suffix match is case-insensitive.

    FileNotFoundError when a local directory does not exist or an S3 bucket does not exist. An S3 prefix with no
    objects gives an empty list (S3 has no directories).
    """
    sfx = tuple(s.lower() for s in suffixes) if suffixes else None

    def keep(name: str) -> bool:
        return sfx is None or name.lower().endswith(sfx)

    if is_remote(uri):
        return sorted(u for u, _ in iter_files(uri) if keep(u))
    root = _local_path(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"{uri}: no such directory")
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and keep(p.name))


def iter_files(uri: str) -> Iterator[tuple[str, int]]:
    """``(URI, size in bytes)`` of every file under ``uri`` (recursive), streamed in no guaranteed order: an S3
    prefix one LIST page (1,000 keys) at a time, with no request per object; a local folder one entry at a time.
    FileNotFoundError as :func:`list_files`."""
    if is_remote(uri):
        bucket, key = _split_s3(uri)
        scheme = str(uri).split("://", 1)[0]
        prefix = f"{key}/" if key else ""
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield f"{scheme}://{bucket}/{obj['Key']}", int(obj.get("Size", 0))
        except Exception as exc:  # noqa: BLE001
            if _is_not_found(exc):
                raise FileNotFoundError(f"{uri}: bucket {bucket!r} does not exist") from exc
            raise
        return
    root = _local_path(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"{uri}: no such directory")
    for p in root.rglob("*"):
        if p.is_file():
            yield str(p), p.stat().st_size


def makedirs(uri: str) -> None:
    """Create a local directory (with parents). No-op for S3 (prefixes need no creation)."""
    if not is_remote(uri):
        _local_path(uri).mkdir(parents=True, exist_ok=True)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` keeping relative paths (each file written atomically)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{local_dir}: no such directory")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if is_remote(uri):
            write_bytes_atomic(join(uri, rel), path.read_bytes())
        else:
            dest = _local_path(uri) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
