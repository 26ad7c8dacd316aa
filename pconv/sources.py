"""File sets: a folder (recursive), a zip (local or ``s3://...zip``) or an ``s3://`` prefix, as ``(key, reader)``
items sorted by key. Ingestion, evaluation and folder inpainting list their inputs through :class:`Source`; keys are
paths relative to the source, readers fetch the bytes on demand. No Ray, no MLflow.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pconv import storage


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
    """Enumerates ``(key, reader)`` items of a folder, zip or S3 prefix; raises SourceError if it is missing or unreadable."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._zip: zipfile.ZipFile | None = None
        self._tmp: str | None = None
        self.kind = self._open()

    def _open(self) -> str:
        uri = self.uri
        if uri.lower().endswith(".zip"):
            if storage.is_remote(uri):
                try:
                    present = storage.exists(uri)
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
        if storage.is_remote(uri):
            try:
                present = storage.exists(uri)
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
                    fh.write(storage.read_bytes(self.uri))
                self._open_zip(self._tmp)
            zf = self._zip
            infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
            return [SourceItem(i.filename, (lambda i=i: _read_member(zf, i))) for i in infos]
        files = storage.list_files(self.uri)
        if self.kind == "s3":
            base = self.uri.rstrip("/") + "/"
            return [SourceItem(f[len(base):], (lambda f=f: storage.read_bytes(f))) for f in files]
        base_path = Path(self.uri).expanduser()
        return [SourceItem(Path(f).relative_to(base_path).as_posix(), (lambda f=f: _read_file(Path(f))))
                for f in files]

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
