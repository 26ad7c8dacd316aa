"""File sets: a folder (recursive), a zip (local or ``s3://...zip``) or an ``s3://`` prefix, as ``(key, reader)``
items sorted by key. Ingestion, evaluation and folder inpainting list their inputs through :class:`Source`; keys are
paths relative to the source, readers fetch the bytes on demand. No Ray, no MLflow.

For work spread over processes or machines (the Ray ingest, :mod:`pconv.ingest.job`), :meth:`Source.entries` streams
``(key, size)`` pairs without holding the listing, and :meth:`Source.reader` is a small picklable
:class:`EntryReader` that reads any key in any process: a local path must then be visible there too (the same
machine, or a folder mounted on every node), an ``s3://`` source always is; members of a zip on S3 are read by one
ranged GET each, never by downloading the archive.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pconv.storage import uris


#: Largest file read into memory (a zip member, a local file): 512 MiB. Far above any photo or mask (a full-size
#: Places2 JPEG is ~1 MB; an uncompressed 8-bit RGB TIFF at Pillow's decompression-bomb limit of ~89 M pixels is
#: ~270 MB), and it bounds what one file can cost: a zip member of zeros compresses ~1000:1, so a small archive
#: could otherwise ask for many GB. Larger files are refused (ValueError, i.e. skipped and counted) before reading.
MAX_FILE_BYTES = 512 * 2**20


class SourceError(RuntimeError):
    """The source does not exist or cannot be read (raised when it is opened, before any work)."""


@dataclass
class SourceItem:
    key: str
    read: Callable[[], bytes]


class Source:
    """Enumerates ``(key, reader)`` items of a folder, zip or S3 prefix; raises SourceError if it is missing or
    unreadable."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._zip: zipfile.ZipFile | None = None
        self._tmp: str | None = None
        self.kind = self._open()

    def _open(self) -> str:
        uri = self.uri
        if uri.lower().endswith(".zip"):
            if uris.is_remote(uri):
                try:
                    present = uris.exists(uri)
                except Exception as exc:  # noqa: BLE001
                    raise SourceError(f"source {uri} cannot be read: {exc}") from exc
                if not present:
                    raise SourceError(f"source {uri} does not exist")
                return "zip"  # downloaded in items(), after the destination check
            path = str(Path(uri).expanduser())
            if not Path(path).is_file():
                raise SourceError(f"source {uri} does not exist (expected a .zip file)")
            self._open_zip(path)
            return "zip"
        if uris.is_remote(uri):
            try:
                present = uris.exists(uri)
            except Exception as exc:  # noqa: BLE001 - credentials, endpoint, permissions: say which SRC
                raise SourceError(f"source {uri} cannot be listed: {exc}") from exc
            if not present:
                raise SourceError(f"source {uri} does not exist (no objects under that prefix)")
            return "s3"
        path = Path(uri).expanduser()
        if not path.exists():
            raise SourceError(f"source {uri} does not exist")
        if not path.is_dir():
            raise SourceError(f"source {uri} is neither a directory, a .zip file nor an s3:// prefix")
        return "dir"

    def _open_zip(self, path: str) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"source {self.uri} is not a readable zip archive: {exc}") from exc

    def items(self) -> list[SourceItem]:
        """Every file of the source (directories and zip directory entries excluded), sorted by key."""
        if self.kind == "zip":
            if self._zip is None:  # s3://...zip: fetch once into a temporary file
                fd, self._tmp = tempfile.mkstemp(suffix=".zip", prefix="pconv-src-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(uris.read_bytes(self.uri))
                self._open_zip(self._tmp)
            zf = self._zip
            infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
            return [SourceItem(i.filename, (lambda i=i: _read_member(zf, i))) for i in infos]
        files = uris.list_files(self.uri)
        if self.kind == "s3":
            base = self.uri.rstrip("/") + "/"
            return [SourceItem(f[len(base):], (lambda f=f: uris.read_bytes(f))) for f in files]
        base_path = Path(self.uri).expanduser()
        return [SourceItem(Path(f).relative_to(base_path).as_posix(), (lambda f=f: _read_file(Path(f))))
                for f in files]

    def entries(self) -> Iterator[tuple[str, int]]:
        """Every file as ``(key, size in bytes)``, streamed in no particular order: an S3 prefix one LIST page at a
        time with no request per object, a zip from its central directory (ranged GETs for ``s3://...zip``)."""
        if self.kind == "zip":
            zf = self._zip if self._zip is not None else _zip_of(self.uri, self.reader().version)[0]
            yield from ((i.filename, i.file_size) for i in zf.infolist() if not i.is_dir())
            return
        base, base_path = self.uri.rstrip("/") + "/", Path(self.uri).expanduser()
        for uri, size in uris.iter_files(self.uri):
            yield (uri[len(base):] if self.kind == "s3" else Path(uri).relative_to(base_path).as_posix()), size

    def reader(self) -> "EntryReader":
        """A picklable reader of this source's keys for other processes (see the module docstring)."""
        version: tuple = ()
        if self.kind == "zip":  # the archive's identity: a worker's cached central directory is reused only for it
            fs, path = uris.get_filesystem(self.uri)
            info = fs.get_file_info(path)
            version = (info.size, info.mtime_ns)
        return EntryReader(self.uri, self.kind, version)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tmp:
            os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _too_large(size: int) -> str:
    return f"file too large: {size:,} bytes uncompressed, above the limit of {MAX_FILE_BYTES:,} bytes (refused unread)"


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A zip member's bytes, refused (ValueError) when its declared size is above :data:`MAX_FILE_BYTES`; the read
    itself is bounded too, so a header that lies about the size cannot make it read more."""
    if info.file_size > MAX_FILE_BYTES:
        raise ValueError(_too_large(info.file_size))
    with zf.open(info) as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(_too_large(len(data)))
    return data


def _read_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(_too_large(size))
    return path.read_bytes()


@dataclass(frozen=True)
class EntryReader:
    """Reads one key of a source in any process (made by :meth:`Source.reader`). ValueError for a broken file
    (too large, corrupt zip member: skipped and listed by ingestion); :class:`SourceError` when the source itself
    is not there, e.g. a local folder that this node does not see (a problem of the run, not of one file)."""

    uri: str
    kind: str  # "dir" | "zip" | "s3", as Source.kind
    version: tuple = ()  # zips: (size, mtime_ns) of the archive

    def read(self, key: str) -> bytes:
        if self.kind == "s3":
            return uris.read_bytes(self.uri.rstrip("/") + "/" + key)
        if self.kind == "zip":
            zf, ranged = _zip_of(self.uri, self.version)
            try:
                info = zf.getinfo(key)
            except KeyError:
                raise ValueError(f"no member {key!r} in {self.uri}") from None
            return _read_member(zf, info) if ranged is None else _read_ranged_member(ranged, info)
        root = Path(self.uri).expanduser()
        try:
            return _read_file(root / key)
        except FileNotFoundError:
            if not root.is_dir():
                raise _not_here(self.uri) from None
            raise


def _not_here(uri: str) -> SourceError:
    return SourceError(f"source {uri} is not visible on node {socket.gethostname()}: on a cluster of several "
                       "machines give an s3:// source, or a folder mounted at the same path on every node")


# per process: (uri, version) -> (ZipFile, the ranged file of an S3 zip | None)
_zips: dict[tuple, tuple[zipfile.ZipFile, uris.RangedFile | None]] = {}
_zips_lock = threading.Lock()


def _zip_of(uri: str, version: tuple) -> tuple[zipfile.ZipFile, uris.RangedFile | None]:
    """The archive's ZipFile (central directory parsed once per process and archive version), and for an S3 zip
    the pyarrow file that members are read from by ranged GETs."""
    with _zips_lock:
        if (uri, version) in _zips:
            return _zips[(uri, version)]
        ranged = None
        try:
            if uris.is_remote(uri):
                ranged = uris.open_ranged(uri)
                zf = zipfile.ZipFile(ranged)  # reads the end record and the central directory (ranged GETs)
            else:
                zf = zipfile.ZipFile(Path(uri).expanduser())
        except FileNotFoundError:
            raise _not_here(uri) from None
        except zipfile.BadZipFile as exc:
            # zipfile reports an I/O error while it looks for the end record as "File is not a zip file": say which
            cause = exc.__context__
            if isinstance(cause, OSError):
                raise SourceError(f"source {uri} cannot be read: {cause}") from cause
            raise SourceError(f"source {uri} is not a readable zip archive: {exc}") from exc
        except OSError as exc:
            raise SourceError(f"source {uri} cannot be read: {exc}") from exc
        _zips.clear()  # one archive at a time per process is the use: drop older ones
        _zips[(uri, version)] = (zf, ranged)
        return zf, ranged


def _read_ranged_member(f: uris.RangedFile, info: zipfile.ZipInfo) -> bytes:
    """A member of a zip on S3 by one ranged GET (two when the local header's extra field is longer than the
    central directory says): local header + data, inflated and CRC-checked here (zipfile reads the same way)."""
    if info.file_size > MAX_FILE_BYTES:
        raise ValueError(_too_large(info.file_size))
    header = zipfile.sizeFileHeader
    blob = f.read_at(header + len(info.orig_filename.encode()) + len(info.extra) + info.compress_size,
                     info.header_offset)
    fields = struct.unpack(zipfile.structFileHeader, blob[:header]) if len(blob) >= header else (b"",)
    if fields[0] != zipfile.stringFileHeader:
        raise ValueError(f"{info.filename}: bad local file header (corrupt zip member)")
    start = header + fields[10] + fields[11]  # file name and extra field lengths
    if len(blob) < start + info.compress_size:
        blob += f.read_at(start + info.compress_size - len(blob), info.header_offset + len(blob))
    data = blob[start:start + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        out = data
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        out = zlib.decompressobj(-15).decompress(data, MAX_FILE_BYTES + 1)
    else:
        raise ValueError(f"{info.filename}: zip compression method {info.compress_type} is not supported here "
                         "(stored and deflated are)")
    if len(out) > MAX_FILE_BYTES:
        raise ValueError(_too_large(len(out)))
    if zlib.crc32(out) != info.CRC or len(out) != info.file_size:
        raise ValueError(f"{info.filename}: CRC or size mismatch (corrupt zip member)")
    return out
