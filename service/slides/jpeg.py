"""Baseline JPEG to RGB for the tile paths: libjpeg-turbo through simplejpeg (its TurboJPEG binding), strict.

Strict because libjpeg only *warns* on damaged entropy-coded data ("Corrupt JPEG data: premature end of data
segment", "Premature end of JPEG file") and fills the rest of the image with grey or garbage. OpenSlide turns
those warnings into errors and refuses the tile; imagecodecs' decoder returns the damaged pixels without a
word, so an SVS or NDPI with one damaged tile was analysed on them. Here such a stream raises
`DamagedJpegError`. A stream that does not decode even leniently (another codec, 12-bit samples, a broken
header) raises plain `ValueError`, and callers may hand it to a decoder that knows more.

libjpeg-turbo, ISLOW IDCT and smooth upsampling in both, so the pixels are imagecodecs' (and OpenSlide's).
"""

from __future__ import annotations

import numpy as np
import simplejpeg


class DamagedJpegError(ValueError):
    """The stream decodes only by ignoring libjpeg's corrupt-data warnings: its pixels are not the image's."""


def decode_rgb(stream: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [h, w, 3] of a complete JPEG stream (its own markers decide the colour transform, as in
    libjpeg), written into `out` when it is a C-contiguous array of exactly that shape, else a new array."""
    try:
        if out is not None:
            h, w = simplejpeg.decode_jpeg_header(stream)[:2]
            if not (out.shape == (h, w, 3) and out.dtype == np.uint8 and out.flags.c_contiguous):
                out = None
        return simplejpeg.decode_jpeg(stream, colorspace="RGB", buffer=out, strict=True)
    except ValueError as strict:
        try:
            simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=False)
        except ValueError:
            raise strict from None
        raise DamagedJpegError(f"damaged JPEG data ({strict})") from None
