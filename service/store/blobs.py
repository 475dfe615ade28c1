"""Blob store for slides and results. Keys are opaque relative paths built from ids, never client names.

`FileBlobStore` keeps them on a filesystem path (local disk or a shared mount). Writes are atomic: bytes go to
a temporary file in the same directory and are renamed into place, so a reader never sees half a file and a
crash leaves only a `.part` file that `sweep_partials` removes. `S3BlobStore` (`service.store.s3`, the `s3`
extra) keeps them in an S3-compatible bucket; workers then read a slide through `local_copy`, a copy in a
bounded local cache. `make_blob_store(settings)` picks one from `MSTAR_BLOB_URL`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from service.errors import MstarError

if TYPE_CHECKING:
    from service.config import Settings

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class BlobStoreError(MstarError):
    """The blob store cannot be used (missing bucket, rejected credentials, unreachable endpoint).

    The message says what is wrong and never carries credentials; the API answers 503 with it."""

    code = "store_unavailable"
    http_status = 503


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobWriter:
    """A streaming write with a byte count and a running SHA-256; `commit(key)` publishes it atomically.

    The bytes are staged in a local file (`store.staging`) so they can be hashed and probed before they are
    published; a remote store uploads the staged file on `commit`."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        store.staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.staging, suffix=".part")
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def commit(self, key: str) -> None:
        self.close()
        self._store.put_file(key, self.path, move=True)

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


class BlobStore(ABC):
    """Where slides and results live. Every worker and the gateway must reach the same store."""

    staging: Path  # local folder for `BlobWriter` files before they are published
    is_local: bool = False  # True when `local_path` is the stored blob itself (no copy, no download)

    @abstractmethod
    def put_file(self, key: str, src: Path, *, move: bool = False) -> None: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A path on this machine holding the blob (a copy for remote stores)."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified unix time) of every blob under `prefix/`: what a sweep of short-lived blobs reads."""

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """`local_path` held for the duration of the block (a remote store's cache cannot evict it meanwhile)."""
        yield self.local_path(key)

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def check(self) -> None:
        """Raise `BlobStoreError` saying what is wrong if the store cannot be written (start-up, /readyz)."""
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.staging, suffix=".part"):
                pass
        except OSError as err:
            raise BlobStoreError(f"cannot write to the blob staging folder {self.staging} ({err.strerror})") from err

    def sweep_partials(self) -> int:
        """Remove staged files left by a crash mid-write; returns how many."""
        n = 0
        if self.staging.is_dir():
            for p in self.staging.rglob("*.part"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def describe(self) -> str:
        """Where the blobs are, for logs (no credentials)."""
        return type(self).__name__


class FileBlobStore(BlobStore):
    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging = self.root / ".staging"
        self.staging.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move and Path(src).stat().st_dev == self.root.stat().st_dev:
            os.replace(src, dest)
            return
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if move:
            Path(src).unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():  # a folder blob: a DICOM series slide (`service.dicom_series`)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        self.delete(prefix.rstrip("/"))  # a prefix here is a folder (or file) path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def list_prefix(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".part"):
                try:
                    yield p.relative_to(self.root).as_posix(), p.stat().st_mtime
                except FileNotFoundError:  # removed meanwhile
                    continue

    def describe(self) -> str:
        return str(self.root)

    def sweep_partials(self) -> int:
        """Remove temporary files left by a crash mid-write; returns how many."""
        n = 0
        for p in self.root.rglob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def files(self) -> Iterator[Path]:
        """Every committed blob (used by tests to prove nothing is orphaned)."""
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and ".staging" not in p.parts:
                yield p


def make_blob_store(settings: Settings) -> BlobStore:
    """The store `settings` name: S3 when `MSTAR_BLOB_URL=s3://...`, else files under `data_dir/blobs`."""
    if settings.blob_url:
        try:
            from service.store.s3 import S3BlobStore
        except ImportError as err:
            raise BlobStoreError(
                f"MSTAR_BLOB_URL={settings.blob_url} needs boto3 ({err.name} is missing): pip install 'mstar[s3]'"
            ) from err
        return S3BlobStore.from_settings(settings)
    return FileBlobStore(settings.blob_dir)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
