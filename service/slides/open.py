"""`open_slide`: one entry point that picks the reader from the file's bytes and applies the safety checks."""

from __future__ import annotations

from pathlib import Path

from service.errors import (
    CorruptSlideError,
    InvalidParameterError,
    SlideError,
    UnsupportedFormatError,
)
from service.slides.base import SlideReader
from service.slides.mpp import override_mpp, require_mpp
from service.slides.sniff import sniff_format

__all__ = ["DEFAULT_MAX_SIDE", "open_slide", "require_mpp"]

DEFAULT_MAX_SIDE = 200_000
# Plain (untiled) images above this are not "tiles"; they must be converted to a tiled pyramid first.
MAX_PLAIN_IMAGE_PIXELS = 50_000_000


def _open_tiff(path: Path, fmt: str, max_side: int, mpp_override: float | None) -> SlideReader:
    from service.slides.readers.tiff_reader import TiffReader, inspect_tiff

    info = inspect_tiff(path, max_side=max_side)  # bomb / truncation checks before any decode
    if fmt == "ome-tiff" or (fmt == "tiff" and info.subifds):
        # OpenSlide ignores SubIFD pyramids (it would see level 0 only); tifffile reads them.
        return TiffReader(path, max_side=max_side)
    if fmt in ("svs", "ndpi") or info.tiled:
        from service.slides.readers.openslide_reader import OpenSlideReader

        try:
            return OpenSlideReader(path, max_side=max_side)
        except UnsupportedFormatError as exc:
            if fmt != "tiff":  # the bytes say SVS/NDPI, so OpenSlide refusing it means damage
                raise CorruptSlideError(
                    f"{fmt.upper()} file is damaged or incomplete ({exc})", slide=path.name
                ) from exc
            # a tiled TIFF layout OpenSlide refuses (e.g. an unusual codec)
            return TiffReader(path, max_side=max_side)
    # A stripped, single-image TIFF: a tile (Pillow) when small, else tifffile strip by strip.
    if info.width * info.height <= MAX_PLAIN_IMAGE_PIXELS:
        from service.slides.readers.image_reader import ImageReader

        return ImageReader(path, mpp_override=mpp_override, max_side=max_side)
    return TiffReader(path, max_side=max_side)


def open_slide(path: str | Path, *, mpp_override: float | None = None, max_side: int = DEFAULT_MAX_SIDE) -> SlideReader:
    """Open a slide (file, or folder of a DICOM series) read-only.

    `mpp_override` replaces whatever µm/px the file claims (source "override"); `max_side` caps the declared
    size of any level, checked before decoding (decompression-bomb guard). Raises a `SlideError` subclass on
    any refusal. Plain PNG/JPEG/TIFF tiles need `mpp_override`: their dpi tags are not microscope scales.
    """
    path = Path(path)
    if int(max_side) < 1:
        raise InvalidParameterError(f"max_side must be positive, got {max_side}")
    override = override_mpp(mpp_override) if mpp_override is not None else None
    fmt = sniff_format(path)
    reader: SlideReader
    if fmt in ("svs", "ndpi", "ome-tiff", "tiff"):
        reader = _open_tiff(path, fmt, max_side, mpp_override)
    elif fmt == "mrxs":
        from service.slides.readers.openslide_reader import OpenSlideReader

        reader = OpenSlideReader(path, max_side=max_side)
    elif fmt in ("dicom", "dicom-dir"):
        from service.slides.readers.dicom_reader import DicomReader

        reader = DicomReader(path, max_side=max_side)
    elif fmt in ("png", "jpeg"):
        from service.slides.readers.image_reader import ImageReader

        reader = ImageReader(path, mpp_override=mpp_override, max_side=max_side)
    else:  # pragma: no cover - sniff_format only returns the formats above
        raise UnsupportedFormatError(f"format {fmt!r} has no reader", slide=path.name)
    reader.format = fmt
    if override is not None:
        reader.mpp = override
    return reader


def open_slide_checked(
    path: str | Path, *, mpp_override: float | None = None, max_side: int = DEFAULT_MAX_SIDE
) -> SlideReader:
    """`open_slide` that also insists on a usable µm/px (what tiling needs), closing the reader on refusal."""
    reader = open_slide(path, mpp_override=mpp_override, max_side=max_side)
    try:
        require_mpp(reader)
    except SlideError:
        reader.close()
        raise
    return reader
