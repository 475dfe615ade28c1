"""µm/px from the metadata each container carries, always with its source.

Anything outside `MPP_MIN..MPP_MAX` (e.g. the 72 dpi most image writers put in TIFF/PNG tags) counts as
missing, because tiling at a wrong scale silently ruins every downstream feature.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import TYPE_CHECKING

from service.errors import InvalidParameterError, MissingMppError
from service.slides.base import MPP_MAX, MPP_MIN, Mpp, plausible_mpp

if TYPE_CHECKING:
    from service.slides.base import SlideReader

# µm per unit, for OME `PhysicalSizeXUnit` and friends.
_UNIT_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def make_mpp(x: float | None, y: float | None, source: str) -> Mpp | None:
    """An `Mpp` when both axes are plausible; a missing axis borrows the other (square pixels)."""
    try:
        x = None if x is None else float(x)
        y = None if y is None else float(y)
    except (TypeError, ValueError):
        return None
    if x is None:
        x = y
    if y is None:
        y = x
    if not (plausible_mpp(x) and plausible_mpp(y)):
        return None
    return Mpp(float(x), float(y), source)


def override_mpp(value: float) -> Mpp:
    """The caller's µm/px; refused when it cannot be a microscope scale (catches dpi or mm by mistake)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"µm/px override {value!r} is not a number") from None
    if not plausible_mpp(v):
        raise InvalidParameterError(
            f"µm/px override {v} is outside the plausible range {MPP_MIN}-{MPP_MAX} µm/px "
            "(e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    return Mpp(v, v, "override")


def from_tiff_resolution(xres: float | None, yres: float | None, unit: int | str | None) -> Mpp | None:
    """TIFF X/YResolution are pixels per unit; unit 2 = inch, 3 = centimetre, 1/none = no absolute unit."""
    if isinstance(unit, str):
        unit = {"inch": 2, "centimeter": 3, "cm": 3, "none": 1}.get(unit.lower())
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 2)
    if um_per_unit is None:
        return None

    def conv(r: float | None) -> float | None:
        try:
            r = float(r) if r is not None else None
        except (TypeError, ValueError):
            return None
        return um_per_unit / r if r and r > 0 else None

    return make_mpp(conv(xres), conv(yres), "tiff-resolution")


def from_openslide_properties(props: Mapping[str, str]) -> Mpp | None:
    """Vendor keys first (they are what the scanner wrote), then OpenSlide's normalised `openslide.mpp-*`."""
    vendor = props.get("openslide.vendor", "")
    if "aperio.MPP" in props:
        m = make_mpp(props["aperio.MPP"], props["aperio.MPP"], "aperio")
        if m is not None:
            return m
    x, y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
    if x is None and y is None:
        return None
    if vendor == "dicom":
        source = "dicom-pixel-spacing"
    elif "tiff.XResolution" in props:
        source = "tiff-resolution"  # OpenSlide derives mpp from the resolution tags for NDPI / generic TIFF
    else:
        source = f"openslide-{vendor}" if vendor else "openslide"
    return make_mpp(x, y, source)


def from_ome_xml(xml: str | None, image_index: int = 0) -> Mpp | None:
    """`Pixels/@PhysicalSizeX|Y` with their units (µm when absent, as the OME schema says)."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if re.sub(r"^\{.*\}", "", el.tag) == "Pixels"]
    if len(pixels) <= image_index:
        return None
    px = pixels[image_index].attrib

    def conv(axis: str) -> float | None:
        val = px.get(f"PhysicalSize{axis}")
        if val is None:
            return None
        factor = _UNIT_UM.get(px.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            return float(val) * factor if factor is not None else None
        except ValueError:
            return None

    return make_mpp(conv("X"), conv("Y"), "ome")


def from_pixel_spacing(pixel_spacing_mm: tuple[float, float] | None) -> Mpp | None:
    """DICOM PixelSpacing is (row spacing = y, column spacing = x) in millimetres."""
    if not pixel_spacing_mm or len(pixel_spacing_mm) != 2:
        return None
    row_mm, col_mm = pixel_spacing_mm
    try:
        return make_mpp(float(col_mm) * 1000.0, float(row_mm) * 1000.0, "dicom-pixel-spacing")
    except (TypeError, ValueError):
        return None


def require_mpp(reader: SlideReader) -> Mpp:
    """The slide's µm/px, or a refusal that tells the user how to give one."""
    if reader.mpp is None:
        raise MissingMppError(
            "the slide carries no usable µm/px (microns per pixel) metadata, so it cannot be tiled at a "
            f"physical scale; pass the scanner's value with --mpp-override (range {MPP_MIN}-{MPP_MAX}, "
            "e.g. 0.25 for 40x, 0.5 for 20x)",
            slide=reader.path.name,
        )
    return reader.mpp
