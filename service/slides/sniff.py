"""Container detection from the bytes, never the filename: uploads arrive with arbitrary names, and a
mislabelled extension must not route a file to the wrong decoder."""

from __future__ import annotations

from pathlib import Path

from service.errors import CorruptSlideError, SlideNotFoundError, UnsupportedFormatError
from service.slides.formats import FORMATS, TIFF_FORMATS

__all__ = ["FORMATS", "TIFF_FORMATS", "is_dicom_file", "sniff_format"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

# Known containers we do not read, with a hint the user can act on.
_KNOWN_UNSUPPORTED = (
    (b"ZISRAWFILE", "Zeiss CZI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (b"\xffO\xffQ", "raw JPEG 2000 codestream"),
    (b"PK\x03\x04", "a ZIP archive (unpack it and pass the slide file or DICOM folder)"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"\x89HDF\r\n\x1a\n", "HDF5 (features or tiles, not a slide)"),
)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part-10 file: the 4-byte `DICM` magic after the 128-byte preamble."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _tiff_flavour(path: Path) -> str:
    """Cheap look at the first IFD: Aperio writes 'Aperio' into ImageDescription, NDPI has its own tags,
    OME puts OME-XML in the first description."""
    import tifffile

    from service.slides.readers.tiff_reader import first_page, tifffile_warnings

    try:
        with tifffile_warnings(), tifffile.TiffFile(path) as tif:
            first_page(tif, path.name)
            if tif.is_ndpi:
                return "ndpi"
            if tif.is_svs:
                return "svs"
            if tif.is_ome:
                return "ome-tiff"
            return "tiff"
    except CorruptSlideError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged headers
        raise CorruptSlideError(f"TIFF header cannot be parsed ({exc})", slide=path.name) from exc


def sniff_format(path: str | Path) -> str:
    """One of `FORMATS`, from the file's magic bytes (a folder: whether it holds DICOM files)."""
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if any(is_dicom_file(p) for p in sorted(path.iterdir()) if p.is_file()):
            return "dicom-dir"
        raise UnsupportedFormatError(
            "folder holds no DICOM files (only a DICOM WSI series can be a folder)", slide=path.name
        )
    if not path.is_file():  # a FIFO or device would block the read below until a writer came
        raise UnsupportedFormatError("not a regular file (a pipe, socket or device)", slide=path.name)
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise SlideNotFoundError(f"cannot read file: {exc.strerror}", slide=path.name) from exc
    if not head:
        raise CorruptSlideError("file is empty", slide=path.name)
    if head[:4] in _TIFF_MAGIC:
        return _tiff_flavour(path)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"[GENERAL]"):  # MIRAX index (.mrxs) is an INI file next to its data folder
        return "mrxs"
    for magic, name in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            raise UnsupportedFormatError(f"{name} is not a supported slide format", slide=path.name)
    raise UnsupportedFormatError(
        "not a recognised whole-slide or image format (supported: Aperio SVS, Hamamatsu NDPI, MIRAX MRXS, "
        "tiled/OME TIFF, DICOM WSI, PNG/JPEG tiles)",
        slide=path.name,
    )
