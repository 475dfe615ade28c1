"""The image size a JPEG or JPEG 2000 stream declares, read from its header bytes before any decoder runs.

Why: a decoder allocates what the header declares. One stored tile whose header claimed 60,000 x 60,000 px
made libjpeg-turbo (through imagecodecs) allocate and fill a 10 GB array, and OpenJPEG grow the process to 24 GB
until the kernel killed it. Every stored tile or frame is checked against the size its container gives it
(TIFF tile size, MIRAX camera image, DICOM frame) first, as OpenSlide does ("Dimensional mismatch")."""

from __future__ import annotations

import struct

import numpy as np

# start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 JPG, CC DAC), and JPEG-LS's SOF55 (F7; the
# same frame header: DICOM frames in JPEG-LS were refused as having none)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_SOS, _SOI = 0xDA, 0xD8


def jpeg_segments(data: bytes):
    """(marker, offset) of each marker segment of a JPEG stream's header, from just after SOI up to and including
    SOS (the scan's start); fill bytes skipped. ValueError where a segment does not start with 0xFF. The one
    header walk behind every JPEG header check here and in `fasttiles`."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"malformed JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        yield marker, i
        if marker == _SOS:
            return
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]


def jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG stream's frame header (SOFn), found by walking its marker segments from SOI.
    ValueError where there is no SOI, the segments are malformed, or the scan starts before any frame."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != _SOI:
        raise ValueError("not a JPEG stream (no SOI marker at its start)")
    for marker, i in jpeg_segments(data):
        if marker in _SOF:
            if i + 9 > len(data):
                break
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if marker == _SOS:
            raise ValueError("JPEG scan starts before any frame header")
    raise ValueError("JPEG stream ends before its frame header")


def j2k_codestream_size(codestream: bytes) -> tuple[int, int]:
    """(width, height) a raw J2K codestream declares in its SIZ segment, which must follow the SOC marker.
    ValueError where the codestream does not start SOC, SIZ, or declares an empty image."""
    if len(codestream) < 24 or codestream[:4] != b"\xff\x4f\xff\x51":
        raise ValueError("not a JPEG 2000 codestream (no SOC and SIZ markers at its start)")
    x, y, x0, y0 = struct.unpack_from(">IIII", codestream, 8)
    if x <= x0 or y <= y0:
        raise ValueError(f"codestream header declares an empty image ({x} x {y} from {x0}, {y0})")
    return x - x0, y - y0


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The size a JPEG or raw JPEG 2000 stream declares, by its first bytes; None for anything else (other
    codecs decode to the size their container states)."""
    if data[:2] == b"\xff\xd8":
        return jpeg_frame_size(data)
    if data[:4] == b"\xff\x4f\xff\x51":
        return j2k_codestream_size(data)
    return None


def check_size(declared: tuple[int, int], expected: tuple[int, int], what: str) -> None:
    if tuple(declared) != tuple(expected):
        raise ValueError(
            f"{what} header says {declared[0]}x{declared[1]} px, not the {expected[0]}x{expected[1]} its container "
            "gives it"
        )


def jpeg_scan_intact(data: bytes) -> bool:
    """Whether a JPEG stream's entropy-coded data carries no marker but restart markers RST0-7 in turn, as many
    as its restart interval and frame size call for, and ends with EOI: what a stream cut short, overwritten or
    spliced wrongly breaks. Needed before handing a stream to a decoder that treats libjpeg's "corrupt data"
    warnings as success (nvImageCodec decodes such a stream to wrong pixels without an error). Bit flips inside
    the Huffman codes pass it, and so does a stream without restart markers cut short before an EOI. One NumPy
    pass over the bytes (about 0.1 ms a MB)."""
    if len(data) < 4 or data[-2:] != b"\xff\xd9":
        return False
    try:
        sos, expected = _scan_layout(data)
    except (ValueError, struct.error):
        return False
    b = np.frombuffer(data, np.uint8, count=len(data) - 2 - sos, offset=sos)
    ff = np.flatnonzero(b[:-1] == 0xFF)
    nxt = b[ff + 1]
    if np.any((nxt != 0) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))) or (len(b) and b[-1] == 0xFF):
        return False
    rst = nxt[(nxt >= 0xD0) & (nxt <= 0xD7)].astype(np.int64) - 0xD0
    return bool(np.all(rst == np.arange(len(rst)) % 8)) and (expected is None or len(rst) == expected)


def _scan_layout(data: bytes) -> tuple[int, int | None]:
    """(offset of the first entropy-coded byte, the number of restart markers the scan must hold, or None
    without a restart interval) of a single-scan baseline JPEG (ValueError where there is no scan)."""
    interval, mcus = 0, None
    for marker, i in jpeg_segments(data):
        if marker == 0xDD:  # DRI
            interval = struct.unpack_from(">H", data, i + 4)[0]
        elif marker in _SOF:
            height, width, n = *struct.unpack_from(">HH", data, i + 5), data[i + 9]
            f = data[i + 11 : i + 11 + 3 * n : 3]
            mh, mv = (8 * max(x >> 4 for x in f), 8 * max(x & 15 for x in f)) if n > 1 else (8, 8)
            mcus = -(-width // mh) * -(-height // mv)
        elif marker == _SOS:
            need = -(-mcus // interval) - 1 if interval and mcus else None
            return i + 2 + struct.unpack_from(">H", data, i + 2)[0], need
    raise ValueError("JPEG stream has no scan")


def stream_layout(data: bytes) -> str:
    """How a JPEG or raw J2K stream is coded, as a short key: the unit a batch decoder's pixels are checked
    against the CPU path's (`batchdecode.BatchDecoder.verdict`), since a decoder can be right on one layout
    and wrong on another (an RGB-coded JPEG whose Adobe marker it ignores, chroma it upsamples its own way).
    JPEG: frame type, each component's sampling factors, the Adobe transform where a segment gives one
    ("jpeg sof0 2x2,1x1,1x1", "jpeg sof0 1x1,1x1,1x1 adobe0"); J2K: sample depth, each component's
    subsampling and whether the multiple-component transform is on ("j2k 8b 1x1,2x1,2x1 mct0").
    ValueError for anything else or a malformed header."""
    if data[:2] == b"\xff\xd8":
        frame, adobe = "", ""
        for marker, i in jpeg_segments(data):
            if marker in _SOF:
                n = data[i + 9]
                factors = data[i + 11 : i + 10 + 3 * n : 3]
                if len(factors) != n:
                    break
                frame = f"sof{marker - 0xC0} " + ",".join(f"{f >> 4}x{f & 15}" for f in factors)
            elif marker == 0xEE and data[i + 4 : i + 9] == b"Adobe" and i + 15 < len(data):
                adobe = f" adobe{data[i + 15]}"
        if not frame:
            raise ValueError("JPEG stream has no frame header")
        return f"jpeg {frame}{adobe}"
    comps = j2k_components(data)
    depths = sorted({depth for depth, _, _ in comps})
    sampling = ",".join(f"{dx}x{dy}" for _, dx, dy in comps)
    i, mct = 4 + struct.unpack_from(">H", data, 4)[0], None
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0x90:  # main header, up to the first tile
        if data[i + 1] == 0x52 and i + 8 < len(data):  # COD: Lcod (2), Scod, progression, layers (2), MCT
            mct = data[i + 8]
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    if mct is None:
        raise ValueError("J2K main header has no COD segment")
    return f"j2k {'/'.join(map(str, depths))}b {sampling} mct{mct}"


def j2k_components(codestream: bytes) -> list[tuple[int, int, int]]:
    """(bit depth, horizontal subsampling, vertical subsampling) of each component a raw J2K codestream's SIZ
    segment declares (ValueError where the header is not one or is cut short)."""
    j2k_codestream_size(codestream)  # SOC, SIZ, a non-empty image
    n = struct.unpack_from(">H", codestream, 40)[0]
    raw = codestream[42 : 42 + 3 * n]
    if n < 1 or len(raw) != 3 * n or 0 in raw[1::3] or 0 in raw[2::3]:
        raise ValueError("J2K SIZ segment is cut short or declares no subsampling")
    return [((raw[k] & 0x7F) + 1, raw[k + 1], raw[k + 2]) for k in range(0, 3 * n, 3)]
