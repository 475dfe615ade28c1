"""`S3BlobStore`: slides and results in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...) through boto3.

Why it looks the way it does:

* Writes go through boto3's managed transfer (multipart above `s3_part_size_mb`, parts in parallel). An S3 object
  appears whole or not at all, so a reader never sees half a result and a re-run overwrites atomically.
* Slide decoders (OpenSlide, tifffile) need a seekable local file, so a worker reads a slide through
  `local_copy`: a copy in a bounded cache on its own disk, keyed by key + ETag + size, so a slide is fetched once
  per machine and a changed object is never served stale. Concurrent fetches of one object (threads or
  processes) take a per-entry `flock`: one downloads, the others wait and reuse. A download goes to a `.part`
  file that is renamed only once complete and checked (size, ETag unchanged), so a partial file is never used.
  Copies in use hold a shared lock; eviction (least recently used first, above `s3_cache_max_gb`) only removes
  copies it can lock exclusively, and removes the entry's lock files and folder with them.
* Credentials come from the standard AWS chain (environment, shared config/profile, instance or pod role) and
  are never read, stored or logged here. Errors become `BlobStoreError` with a message that says what is wrong
  (no such bucket, credentials rejected, endpoint unreachable) and no secret.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from service.store.blobs import BlobStore, BlobStoreError, check_key

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("mstar.store.s3")

_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}


class _Changed(Exception):
    """The object changed while it was being copied: start again from a fresh HEAD."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def _code(err: ClientError) -> str:
    resp = err.response
    return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3BlobStore(BlobStore):
    def __init__(
        self,
        url: str,
        *,
        staging: Path,
        cache_dir: Path,
        cache_max_bytes: int = 50 * 1024**3,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        part_size: int = 64 * 1024**2,
        max_concurrency: int = 8,
        page_size: int = 1000,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint_url = endpoint_url
        self.region = region
        self.staging = Path(staging)
        self.cache_dir = Path(cache_dir)
        self.cache_max_bytes = int(cache_max_bytes)
        self.page_size = max(1, min(1000, int(page_size)))
        self.transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._config = Config(
            region_name=region,
            connect_timeout=10,
            read_timeout=120,
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": addressing_style},
            max_pool_connections=max(10, 2 * max_concurrency),
        )
        self._client_lock = threading.Lock()
        self._client_pid: int | None = None
        self._client_obj: Any = None
        self.staging.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        assert settings.blob_url
        local = settings.data_dir / "s3"
        return cls(
            settings.blob_url,
            staging=local / "staging",
            cache_dir=settings.s3_cache_dir or settings.data_dir / "s3-cache",
            cache_max_bytes=int(settings.s3_cache_max_gb * 1024**3),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            part_size=settings.s3_part_size_mb * 1024**2,
            max_concurrency=settings.s3_max_concurrency,
        )

    # --- plumbing -------------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """One boto3 client per process (clients are thread-safe but must not cross a fork)."""
        with self._client_lock:
            if self._client_obj is None or self._client_pid != os.getpid():
                session = boto3.session.Session()
                self._client_obj = session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
                self._client_pid = os.getpid()
            return self._client_obj

    def describe(self) -> str:
        where = "AWS" if not self.endpoint_url else urlparse(self.endpoint_url)._replace(netloc=self._host()).geturl()
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    def _host(self) -> str:
        netloc = urlparse(self.endpoint_url or "").netloc
        return netloc.rsplit("@", 1)[-1]  # never echo user:password@ from a URL

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, err: Exception, what: str, bucket: str | None = None) -> BlobStoreError:
        """A `BlobStoreError` that says what is wrong, without secrets."""
        where = f"bucket {bucket or self.bucket!r}" + (f" at {self._host()}" if self.endpoint_url else "")
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            msg = (
                f"{what}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or give the machine a role)"
            )
        elif isinstance(err, ClientError):
            code = _code(err)
            if code in _NO_BUCKET or (code in _MISSING and what.startswith("checking")):
                msg = f"{what}: {where} does not exist"
            elif code in _DENIED:
                msg = f"{what}: the object store refused access to {where} ({code}); check the credentials and policy"
            else:
                msg = f"{what}: the object store answered {code} for {where}"
        elif isinstance(err, BotoConnectionError):
            msg = f"{what}: cannot reach the object store for {where} ({type(err).__name__})"
        else:
            msg = f"{what}: object store error for {where} ({type(err).__name__})"
        return BlobStoreError(msg)

    def _head(self, full: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as err:
            if _code(err) in _MISSING:
                return None
            raise self._error(err, f"reading {full}") from None
        except BotoCoreError as err:
            raise self._error(err, f"reading {full}") from None

    # --- BlobStore ------------------------------------------------------------------------------------------

    def check(self) -> None:
        try:  # a LIST, not a HEAD: its error body names the problem (InvalidAccessKeyId, NoSuchBucket, ...)
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "checking the blob store") from None
        super().check()  # the local staging folder

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        full = self._full(key)
        try:
            self.client.upload_file(str(src), self.bucket, full, Config=self.transfer)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"uploading {full}") from None
        except Exception as err:  # s3transfer wraps failures of its part uploads
            cause = err.__cause__ or err.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise self._error(cause, f"uploading {full}") from None
            raise
        if move:
            Path(src).unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        """A streaming body (read in chunks; close it). A missing blob raises FileNotFoundError."""
        full = self._full(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
        except ClientError as err:
            if _code(err) in _MISSING:
                raise FileNotFoundError(f"no blob {key}") from None
            raise self._error(err, f"reading {full}") from None
        except BotoCoreError as err:
            raise self._error(err, f"reading {full}") from None

    def exists(self, key: str) -> bool:
        return self._head(self._full(key)) is not None

    def size(self, key: str) -> int:
        head = self._head(self._full(key))
        if head is None:
            raise FileNotFoundError(f"no blob {key}")
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        """The blob, or the folder blob (a DICOM series) of that name, as `FileBlobStore.delete`."""
        self.delete_prefix(key)

    def delete_prefix(self, prefix: str) -> None:
        """The blob named `prefix` and everything under `prefix/` (not `prefix2/...`), a page at a time."""
        full = self._full(prefix.rstrip("/"))
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full + "/", PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if not keys:
                    continue
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise BlobStoreError(
                        f"deleting {full}/: {len(resp['Errors'])} object(s) not deleted "
                        f"({first.get('Code')} for {first.get('Key')})"
                    )
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"deleting {full}/") from None

    def list_prefix(self, prefix: str) -> Iterator[tuple[str, float]]:
        full = self._full(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], obj["LastModified"].timestamp()
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"listing {full}") from None

    def local_path(self, key: str) -> Path:
        """A cached local copy. Not pinned: prefer `local_copy` while the file is used, so it cannot be evicted."""
        path, pin = self._fetch(key)
        pin.close()
        return path

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path, pin = self._fetch(key)
        try:
            yield path
        finally:
            pin.close()

    def open_external(self, url: str) -> tuple[BinaryIO, int]:
        """Stream an object named by an `s3://bucket/key` URL (a batch manifest line) with the store's client
        and credentials: (body, size). Missing -> FileNotFoundError."""
        bucket, key = parse_s3_url(url)
        if not key:
            raise FileNotFoundError(f"{url} names a bucket, not an object")
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if _code(err) in _MISSING | _NO_BUCKET:
                raise FileNotFoundError(f"{url} does not exist") from None
            raise self._error(err, f"reading {url}", bucket) from None
        except BotoCoreError as err:
            raise self._error(err, f"reading {url}", bucket) from None
        return resp["Body"], int(resp["ContentLength"])

    # --- the local cache ------------------------------------------------------------------------------------

    def _listing(self, full: str) -> list[tuple[str, str, int]] | None:
        """What `full` names: [("", etag, size)] for an object, [(relative key, etag, size), ...] for a folder
        (objects under `full/`, e.g. a DICOM series), None if neither exists."""
        head = self._head(full)
        if head is not None:
            return [("", str(head.get("ETag", "")).strip('"'), int(head["ContentLength"]))]
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full + "/", PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(full) + 1 :]
                    try:
                        check_key(rel)
                    except ValueError:
                        raise BlobStoreError(f"{full}/ holds an object with an unsafe name ({rel!r})") from None
                    out.append((rel, str(obj.get("ETag", "")).strip('"'), int(obj["Size"])))
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"listing {full}/") from None
        return sorted(out) or None

    def _fetch(self, key: str) -> tuple[Path, BinaryIO]:
        """(path of a complete local copy, open pin-lock file holding a shared lock on it)."""
        full = self._full(key)
        for _ in range(3):
            listing = self._listing(full)
            if listing is None:
                raise FileNotFoundError(f"no blob {key}")
            ident = hashlib.sha256(f"{self.bucket}\0{full}\0{listing!r}".encode()).hexdigest()[:32]
            entry = self.cache_dir / ident
            data = entry / Path(key).name  # the key's own name: readers may look at the extension
            pin = _pin(entry)
            try:
                if not _complete(data, listing):
                    with (entry / ".fetch").open("a+b") as lock:
                        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per entry; the others wait and reuse
                        if not _complete(data, listing):
                            self._download(full, entry, data, listing)
                else:
                    os.utime(data)  # last use, for least-recently-used eviction
                self._evict(keep=entry)
                return data, pin
            except _Changed:
                pin.close()
                continue
            except BaseException:
                pin.close()
                raise
        raise BlobStoreError(f"{full} kept changing while it was being copied; try again")

    def _get(self, full: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, full, str(dest), Config=self.transfer)
        except ClientError as err:
            if _code(err) in _MISSING | {"PreconditionFailed", "412"}:
                raise _Changed from None
            raise self._error(err, f"reading {full}") from None
        except BotoCoreError as err:
            raise self._error(err, f"reading {full}") from None
        with dest.open("rb+") as fh:
            os.fsync(fh.fileno())

    def _download(self, full: str, entry: Path, data: Path, listing: list[tuple[str, str, int]]) -> None:
        """Download into a `.part` file (or folder) and rename it into place once complete and unchanged."""
        for stale in entry.glob(".*.part"):  # left by a crash mid-download; we hold the fetch lock
            _remove(stale)
        tmp = entry / f".{uuid.uuid4().hex}.part"
        try:
            if listing[0][0] == "":
                self._get(full, tmp)
            else:
                for rel, _, _ in listing:
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self._get(f"{full}/{rel}", dest)
            if not _complete(tmp, listing) or self._listing(full) != listing:
                raise _Changed  # replaced meanwhile: never keep a mix of two versions
            if data.exists():  # an eviction cut short by a crash left part of a folder here
                _remove(data)
            os.replace(tmp, data)
        finally:
            _remove(tmp)

    def _evict(self, keep: Path) -> None:
        """Above the bound, remove least recently used copies that nobody holds."""
        entries = []
        total = 0
        for entry in self.cache_dir.iterdir():
            try:
                for f in entry.iterdir():
                    if not f.name.startswith("."):
                        size = _size(f)
                        entries.append((f.stat().st_mtime, size, entry))
                        total += size
            except (FileNotFoundError, NotADirectoryError):  # evicted by another process meanwhile
                continue
        if total <= self.cache_max_bytes:
            return
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_max_bytes:
                return
            if entry == keep:
                continue
            try:
                pin = (entry / ".pin").open("a+b")
            except FileNotFoundError:
                continue  # another evictor removed it meanwhile
            with pin:
                try:
                    fcntl.flock(pin, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                for f in entry.iterdir():
                    if f.name not in (".pin", ".fetch"):
                        _remove(f)
                # the lock files go too, .pin last: a fetcher that opened the old .pin finds it unlinked once
                # it gets its lock (`_pin`) and starts again on a new entry
                (entry / ".fetch").unlink(missing_ok=True)
                (entry / ".pin").unlink(missing_ok=True)
                with suppress(OSError):
                    entry.rmdir()
            total -= size
            log.info("evicted %s from the S3 cache (%d bytes)", entry.name, size)

    def clear_cache(self) -> None:
        """Drop every cached copy not in use (tests, operators)."""
        keep_max, self.cache_max_bytes = self.cache_max_bytes, -1
        try:
            self._evict(keep=self.cache_dir / "-")
        finally:
            self.cache_max_bytes = keep_max


def _pin(entry: Path) -> BinaryIO:
    """Open the entry's `.pin` holding a shared lock, creating the entry if needed. An evictor removes the
    entry's files under an exclusive lock, so the lock is only good if `.pin` is still the same file after it
    is taken; otherwise start again."""
    while True:
        entry.mkdir(parents=True, exist_ok=True)
        try:
            pin = (entry / ".pin").open("a+b")
        except FileNotFoundError:  # the entry was evicted between mkdir and open
            continue
        try:
            fcntl.flock(pin, fcntl.LOCK_SH)  # waits only for an evictor busy on this very entry
            if os.fstat(pin.fileno()).st_ino == os.stat(entry / ".pin").st_ino:
                return pin
        except FileNotFoundError:
            pass
        except BaseException:
            pin.close()
            raise
        pin.close()


def _complete(path: Path, listing: list[tuple[str, str, int]]) -> bool:
    """Every file the listing names is there with its size (a folder is renamed into place only when whole)."""
    try:
        if listing[0][0] == "":
            return path.is_file() and path.stat().st_size == listing[0][2]
        return path.is_dir() and all((path / rel).stat().st_size == size for rel, _, size in listing)
    except FileNotFoundError:
        return False


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    """Remove a file or a folder; a folder is renamed aside first, so a crash never leaves half of it in place."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{uuid.uuid4().hex}.part")
        try:
            path.rename(aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["S3BlobStore", "parse_s3_url"]
