"""Where slide bytes come from, copied into a staged `BlobWriter`: a local file, an http(s) URL or an s3:// object
(the multipart body is `service.ingest.multipart`; a DICOM series folder is `service.ingest.series`).

The store always *copies*: it owns its slides (deleting one never touches the source, a later change of the
source cannot alter an analysed slide) and slides are deduplicated by SHA-256, which needs the bytes anyway.
Every source has the same refusals: missing 404 `slide_not_found`, over the upload limit 413 `slide_too_large`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from service.errors import (
    InvalidParameterError,
    SlideNotFoundError,
    SlideTooLargeError,
    SourceNotAllowedError,
    UnsupportedFormatError,
    is_disk_full,
)

CHUNK = 1 << 20
HTTP_TIMEOUT_S = 60.0


def too_large(what: str, size: int | None, max_bytes: int) -> SlideTooLargeError:
    """The one "too large" of every ingest path (413 `slide_too_large`)."""
    got = f" ({size} bytes)" if size is not None else ""
    return SlideTooLargeError(f"{what}{got} exceeds the upload limit of {max_bytes} bytes")


def fetch(source: str, writer: Any, *, max_bytes: int, blobs: Any = None) -> None:
    """Copy a file path, `http(s)://` URL or `s3://` URI into `writer` (the caller closes or discards it)."""
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        fetch_http(source, writer, max_bytes)
    elif scheme == "s3":
        copy_s3_source(blobs, source, writer, max_bytes)
    else:
        fetch_file(Path(source), writer, max_bytes)


def fetch_file(path: Path, writer: Any, max_bytes: int) -> None:
    if path.is_dir():
        raise UnsupportedFormatError("a folder is a slide only as one DICOM WSI series", slide=path.name)
    if not path.is_file():
        raise SlideNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise too_large(str(path), size, max_bytes)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            writer.write(chunk)
            if writer.size > max_bytes:  # grew while we read it
                raise too_large(str(path), writer.size, max_bytes)


def fetch_http(url: str, writer: Any, max_bytes: int) -> None:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=HTTP_TIMEOUT_S, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise SlideNotFoundError(f"{url} answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large(url, int(declared), max_bytes)
            for chunk in resp.iter_bytes(CHUNK):
                writer.write(chunk)
                if writer.size > max_bytes:
                    raise too_large(url, None, max_bytes)
    except httpx.HTTPError as err:
        raise SlideNotFoundError(f"{url} could not be downloaded ({type(err).__name__})") from None


def copy_s3_source(blobs: Any, source: str, writer: Any, max_bytes: int) -> None:
    """Copy the object an `s3://bucket/key` source names into `writer`, read with the S3 store's client and
    credentials. Refusals are typed: no S3 store or a malformed URI (422), too large (413), missing (404)."""
    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise InvalidParameterError(f"{source[:200]!r} is not an s3://bucket/key URI")
    opener = getattr(blobs, "open_external", None)
    if opener is None:
        raise InvalidParameterError(
            f"{source}: s3:// sources need the S3 blob store (MSTAR_BLOB_URL=s3://bucket/prefix); "
            "this deployment keeps blobs on a filesystem: send the slide as a file (or a path, an http(s):// URL)"
        )
    try:
        body, size = opener(source)
    except FileNotFoundError:
        raise SlideNotFoundError(f"{source} does not exist") from None
    with body:
        if size > max_bytes:
            raise too_large(source, size, max_bytes)
        try:
            while chunk := body.read(CHUNK):
                writer.write(chunk)
        except Exception as err:  # a dropped connection mid-object fails this slide, not the batch or gateway
            if is_disk_full(err):
                raise
            raise SlideNotFoundError(f"{source} could not be read ({type(err).__name__})") from None


def check_client_source(blobs: Any, source: str, allowed_buckets: list[str]) -> None:
    """A `source` a *client* names (`POST /slides`): the gateway reads with its own credentials, so only buckets
    the operator listed (`MSTAR_S3_SOURCE_BUCKETS`) may be named, and never the store's own prefix (that would
    copy another tenant's slide or results)."""
    parsed = urlparse(source)
    if parsed.scheme != "s3":
        raise InvalidParameterError(f"`source` must be an s3://bucket/key URI, got {source[:200]!r}")
    key = parsed.path.lstrip("/")
    own_bucket, own_prefix = getattr(blobs, "bucket", None), getattr(blobs, "prefix", "") or ""
    if parsed.netloc == own_bucket and (not own_prefix or key == own_prefix or key.startswith(own_prefix + "/")):
        raise SourceNotAllowedError(f"{source[:200]}: objects inside this service's own store cannot be sources")
    if own_bucket is not None and parsed.netloc not in allowed_buckets:
        raise SourceNotAllowedError(
            f"bucket {parsed.netloc!r} is not one clients may read; the operator lists those in MSTAR_S3_SOURCE_BUCKETS"
        )
