"""A DICOM WSI series as one slide: a folder of instances (batch manifests) or a ZIP of one (uploads).

A series is stored as a blob *folder* `slides/<tenant>/<slide>.dcmdir/` holding its whole-slide instances as
`0000.dcm`, `0001.dcm`, ... (our names, never the client's): `BlobStore.local_path` of that key is the folder,
which `open_slide` reads as a DICOM series. The slide's `sha256` is `series_digest` of the sorted per-file
SHA-256s, so the same series is one slide per tenant however it arrived (folder or ZIP, any file names).

`collect` refuses, each with a reason: an empty folder, one without DICOM files or without a whole-slide image,
several series in one folder, more bytes than the upload limit. It reads header fields only (pydicom, no
pixel data); the slide itself is opened by the workers or by the upload probe in its own process.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import (
    CorruptSlideError,
    InvalidParameterError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from service.slides.formats import SERIES_FORMAT
from service.slides.readers.dicom_reader import WSI_SOP_CLASS
from service.slides.sniff import is_dicom_file

FORMAT = SERIES_FORMAT
MAX_FILES = 4096
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Series:
    """The whole-slide instances of one series (sorted by file name) and their total size."""

    files: tuple[Path, ...]
    series_uid: str
    size: int


def series_digest(file_sha256s: Iterable[str]) -> str:
    """Content id of a series: independent of file names and order."""
    h = hashlib.sha256(b"mstar-dicom-series/1\n")
    for sha in sorted(file_sha256s):
        h.update(sha.encode() + b"\n")
    return h.hexdigest()


def _header(path: Path) -> tuple[str, str] | None:
    """(SOPClassUID, SeriesInstanceUID) from the header alone; None when it cannot be parsed."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # real files carry over-long UIDs and the like
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"], defer_size=1024
            )
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # pydicom raises many types on hostile headers
        return None


def collect(folder: Path, *, max_bytes: int, name: str | None = None, what: str = "folder") -> Series:
    """Check that `folder` holds exactly one DICOM WSI series; its whole-slide instances.

    Other DICOM objects next to the series (a DICOMDIR, annotations) and hidden files are left out; files in
    subfolders are not looked at (`open_slide` reads the folder's own files too)."""
    folder = Path(folder)
    name = name or folder.name
    if not folder.is_dir():
        raise SlideNotFoundError("is not a folder", slide=name)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UnsupportedFormatError(f"the {what} is empty (expected the files of one DICOM WSI series)", slide=name)
    if len(files) > MAX_FILES:
        raise InvalidParameterError(f"the {what} holds {len(files)} files, more than {MAX_FILES}", slide=name)
    dicom = [p for p in files if is_dicom_file(p)]
    if not dicom:
        raise UnsupportedFormatError(
            f"the {what} holds no DICOM files ({len(files)} other file(s)); expected one DICOM WSI series",
            slide=name,
        )
    series: dict[str, list[Path]] = {}
    for i, p in enumerate(dicom):
        header = _header(p)
        if header is None:
            raise CorruptSlideError(f"DICOM header of file {i + 1} of {len(dicom)} cannot be parsed", slide=name)
        sop, uid = header
        if sop == WSI_SOP_CLASS:
            series.setdefault(uid, []).append(p)
    if not series:
        raise UnsupportedFormatError(
            f"no whole-slide image (VL Whole Slide Microscopy) among the {len(dicom)} DICOM file(s) of the {what}",
            slide=name,
        )
    if len(series) > 1:
        raise UnsupportedFormatError(
            f"the {what} holds {len(series)} DICOM WSI series; give each series its own {what} (one slide each)",
            slide=name,
        )
    uid, wsi = next(iter(series.items()))
    size = sum(p.stat().st_size for p in wsi)
    if size > max_bytes:
        raise SlideTooLargeError(f"the series is {size} bytes, over the limit of {max_bytes}", slide=name)
    return Series(tuple(wsi), uid, size)


@dataclass
class StagedSeries:
    """A series copied into blob-store staging (hashed on the way); `commit` publishes it under one key."""

    blobs: Any
    writers: list = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return series_digest(w.sha256 for w in self.writers)

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers)

    def commit(self, key: str) -> None:
        try:
            for i, w in enumerate(self.writers):
                w.commit(f"{key}/{i:04d}.dcm")
        except BaseException:
            self.blobs.delete_prefix(key)
            self.discard()
            raise
        self.writers = []

    def discard(self) -> None:
        for w in self.writers:
            w.discard()
        self.writers = []


def stage(blobs: Any, files: Iterable[Path]) -> StagedSeries:
    """Copy `files` into `blobs` staging, one `BlobWriter` each (nothing is visible until `commit`)."""
    staged = StagedSeries(blobs)
    try:
        for path in files:
            writer = blobs.writer()
            staged.writers.append(writer)
            with Path(path).open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    writer.write(chunk)
            writer.close()
    except BaseException:
        staged.discard()
        raise
    return staged


def is_zip(path: Path) -> bool:
    try:
        with Path(path).open("rb") as fh:
            return fh.read(4) in _ZIP_MAGIC
    except OSError:
        return False


def unpack_zip(archive: Path, dest: Path, *, max_bytes: int, max_files: int = MAX_FILES) -> None:
    """Extract a ZIP's regular files flat into `dest` as `00000`, `00001`, ... (in the order of their names).

    Nothing from the archive names a path here (no traversal), and the sizes are capped before and while
    extracting (a ZIP bomb stops at `max_bytes`)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = sorted(
                (m for m in zf.infolist() if not m.is_dir() and not _ignored_member(m.filename)),
                key=lambda m: m.filename,
            )
            if not members:
                raise UnsupportedFormatError("the ZIP archive holds no files (expected one DICOM WSI series)")
            if len(members) > max_files:
                raise InvalidParameterError(f"the ZIP archive holds {len(members)} files, more than {max_files}")
            if any(m.flag_bits & 0x1 for m in members):
                raise UnsupportedFormatError("the ZIP archive is encrypted")
            if sum(m.file_size for m in members) > max_bytes:
                raise SlideTooLargeError(f"the ZIP archive unpacks to more than the limit of {max_bytes} bytes")
            dest.mkdir(parents=True, exist_ok=True)
            total = 0
            for i, m in enumerate(members):
                with zf.open(m) as src, (dest / f"{i:05d}").open("wb") as out:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        total += len(chunk)
                        if total > max_bytes:
                            raise SlideTooLargeError(f"the ZIP archive unpacks to more than {max_bytes} bytes")
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError) as err:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsupportedFormatError(  # 415 as before ZIPs were read: not a container we can use
            f"the ZIP archive cannot be unpacked ({type(err).__name__}); a ZIP upload holds one DICOM WSI series"
        ) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _ignored_member(name: str) -> bool:
    """macOS resource forks and hidden files that archivers add next to the real content."""
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith(".")


def zip_series(series: Series, dest: Path) -> Path:
    """Write the series' files into an uncompressed ZIP (JPEG frames do not compress) for upload."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, path in enumerate(series.files):
            zf.write(path, arcname=f"{i:04d}.dcm")
    return dest
