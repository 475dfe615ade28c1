"""The one table of slide formats: what the sniffer can name, the extension a stored blob gets, and the label
users see. Ingest (every source), the sniffer and the store all read it, so they cannot disagree again."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlideFormat:
    name: str  # what `sniff_format` returns and `Slide.format` records
    extension: str  # blob key suffix: readers (and the S3 cache, which keeps the key's name) see a usual one
    label: str  # for messages
    tiff: bool = False  # a TIFF container (the sniffer looks at its first IFD to tell the flavours apart)


TABLE: tuple[SlideFormat, ...] = (
    SlideFormat("svs", "svs", "Aperio SVS", tiff=True),
    SlideFormat("ndpi", "ndpi", "Hamamatsu NDPI", tiff=True),
    SlideFormat("ome-tiff", "ome.tiff", "OME-TIFF", tiff=True),
    SlideFormat("tiff", "tiff", "tiled TIFF", tiff=True),
    SlideFormat("dicom", "dcm", "DICOM instance"),
    SlideFormat("dicom-dir", "dcmdir", "DICOM WSI series"),  # a folder of instances under this key
    SlideFormat("png", "png", "PNG tile"),
    SlideFormat("jpeg", "jpg", "JPEG tile"),
    SlideFormat("mrxs", "mrxs", "MIRAX MRXS"),
)
BY_NAME = {f.name: f for f in TABLE}
FORMATS = tuple(f.name for f in TABLE)
TIFF_FORMATS = tuple(f.name for f in TABLE if f.tiff)
#: the format of a DICOM WSI series stored as one folder slide
SERIES_FORMAT = "dicom-dir"


def blob_extension(fmt: str) -> str:
    """The stored blob's extension for a sniffed format (`bin` for anything the table does not know)."""
    found = BY_NAME.get(fmt)
    return found.extension if found else "bin"
