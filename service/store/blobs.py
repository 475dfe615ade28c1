"""Blob store for slides and results. Keys are opaque relative paths built from ids, never client names.

`FileBlobStore` keeps them on a filesystem path (local disk or a shared mount). Writes are atomic: bytes go to
a temporary file in the same directory and are renamed into place, so a reader never sees half a file and a
crash leaves only a `.part` file that `sweep_partials` removes. Several processes (gateway replicas, workers,
`mstar submit --broker`), on one machine or several, share one store and its staging folder: each writer holds an
exclusive `flock` on its `.part` file for the file's whole life, and a sweep removes only the files it can lock,
so it never takes an in-flight upload or ingest from another process. `S3BlobStore` (`service.store.s3`, the `s3`
extra) keeps them in an S3-compatible bucket; workers then read a slide through `local_copy`, a copy in a
bounded local cache. `make_blob_store(settings)` picks one from `MSTAR_BLOB_URL`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from service.errors import MstarError

try:
    import fcntl
except ImportError:  # not POSIX: no file locks, the sweep goes by age alone
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from service.config import Settings

#: a partial that cannot be locked (a file system without `flock`) is removed only once untouched this long
STALE_PARTIAL_S = 3600.0

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


def _lock(fd: int, *, blocking: bool) -> bool | None:
    """Take an exclusive `flock` on `fd`: True when taken, False when another open file holds it (non-blocking
    only), None when this file system takes no such locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL, EBADF: an NFS mount without lock support, some FUSE
        return None
    return True


def _locked_temp(folder: Path, suffix: str = ".part") -> tuple[int, Path]:
    """A new temporary file in `folder`, open read-write and locked (`flock`, exclusive) for as long as the returned
    descriptor, or a duplicate of it, stays open: `sweep_partials`, in any process or on any machine sharing the
    folder, removes only partials it can lock itself, so never a live writer's."""
    while True:
        fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)
        if _lock(fd, blocking=True) is None:  # no locks here: the sweep goes by the file's age instead
            return fd, Path(name)
        # A sweep may have locked and removed the new file before our lock was taken: then it is gone (or the name
        # is another file now), and we start again with a fresh name.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(name)):
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)


def _sweep(paths: Iterable[Path], *, min_age_s: float, stale_after_s: float) -> int:
    """Remove the `.part` files among `paths` whose writer is gone; returns how many.

    A partial is removed when the sweep can lock it (its writer, which holds the lock for the file's life, has
    ended, or crashed) and it is older than `min_age_s`; on a file system that takes no locks, only once it has not
    been written for `stale_after_s`. Mind NFS: it emulates `flock` with byte-range locks, which do conflict
    between machines but not within one process, so a sweep must not run in a process that is writing partials."""
    removed = 0
    for path in paths:
        try:
            # read-write: NFS grants an exclusive lock only on a file open for writing
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # gone meanwhile (committed, discarded), a folder, a link, not ours to open
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            age = time.time() - st.st_mtime
            if age < min_age_s:
                continue
            held = _lock(fd, blocking=False)
            if held is False or (held is None and age < stale_after_s):
                continue  # a live writer's, or possibly one (no locks to tell)
            try:
                if not os.path.samestat(st, os.stat(path)):
                    continue  # the name is another file now
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        finally:
            os.close(fd)  # releases our lock: a writer racing for this name finds it gone and picks another
    return removed


def _sweep_unpacked(staging: Path, *, stale_after_s: float) -> int:
    """Remove the folders a DICOM ZIP was unpacked into (`series-*`) by an ingest that died: nothing else removes
    them. Only folders untouched for `stale_after_s` (an unpack takes minutes at most), so never a live ingest's."""
    removed = 0
    now = time.time()
    for folder in staging.glob("series-*") if staging.is_dir() else ():
        try:
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])
        except OSError:  # removed meanwhile by its own ingest
            continue
        if folder.is_dir() and not folder.is_symlink() and now - newest >= stale_after_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class BlobWriter:
    """A streaming write with a byte count and a running SHA-256; `commit(key)` publishes it atomically.

    The bytes are staged in a local file (`store.staging`) so they can be hashed and probed before they are
    published; a remote store uploads the staged file on `commit`. The staged file stays locked (`flock`) from its
    creation until `commit` or `discard`, after `close` too (while the slide is probed), so `sweep_partials` of
    another process sharing the staging folder leaves it alone."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        store.staging.mkdir(parents=True, exist_ok=True)
        fd, self.path = _locked_temp(store.staging)
        # a second handle on the same open file: it keeps the lock when the write handle is closed
        self._hold: BinaryIO | None = os.fdopen(os.dup(fd), "rb", buffering=0)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
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

    def _release(self) -> None:
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    def commit(self, key: str) -> None:
        self.close()
        try:
            self._store.put_file(key, self.path, move=True)
        finally:
            self._release()

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)
        self._release()  # after the unlink: a sweep never finds the file unlocked while we still count on it


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
            fd, probe = _locked_temp(self.staging)
            try:
                probe.unlink()
            finally:
                os.close(fd)
        except OSError as err:
            raise BlobStoreError(f"cannot write to the blob staging folder {self.staging} ({err.strerror})") from err

    def sweep_partials(self, *, min_age_s: float = 0.0, stale_after_s: float = STALE_PARTIAL_S) -> int:
        """Remove staged files whose writer is gone (a crash mid-write); returns how many.

        Safe while other processes or machines write into the same folder (gateway replicas, `mstar submit
        --broker`): a file is removed only when its writer's lock is gone and it is at least `min_age_s` old; where
        the file system takes no locks, only when it has not been written for `stale_after_s` (an hour)."""
        if not self.staging.is_dir():
            return 0
        n = _sweep(self.staging.rglob("*.part"), min_age_s=min_age_s, stale_after_s=stale_after_s)
        return n + _sweep_unpacked(self.staging, stale_after_s=stale_after_s)

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
        fd, tmp = _locked_temp(dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
                os.replace(tmp, dest)  # still open, so still locked: a sweep cannot take it first
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

    def sweep_partials(self, *, min_age_s: float = 0.0, stale_after_s: float = STALE_PARTIAL_S) -> int:
        """Remove temporary files whose writer is gone, in staging and beside committed blobs (a copy cut short);
        returns how many. Files other processes are writing are kept: see `BlobStore.sweep_partials`."""
        n = _sweep(self.root.rglob("*.part"), min_age_s=min_age_s, stale_after_s=stale_after_s)
        return n + _sweep_unpacked(self.staging, stale_after_s=stale_after_s)

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
