"""Plain PNG / JPEG / small stripped TIFF tiles through Pillow.

These carry no microscope scale (Kather tiles say 72 dpi, i.e. 352 µm/px), so the caller must give µm/px.
The image is decoded once on first read and kept: it is small by construction (`open_slide` sends large
stripped TIFFs to tifffile instead), and Pillow's pixel-count guard is checked before decoding.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from service.errors import CorruptSlideError, MissingMppError, SlideTooLargeError, UnsupportedFormatError
from service.slides.base import MPP_MAX, MPP_MIN, SlideReader
from service.slides.mpp import override_mpp
from service.slides.readers._common import check_dimensions, check_region, to_rgb, white

MAX_IMAGE_PIXELS = 50_000_000


class ImageReader(SlideReader):
    def __init__(self, path: str | Path, *, mpp_override: float | None, max_side: int = 200_000) -> None:
        self.path = Path(path)
        name = self.path.name
        if mpp_override is None:
            raise MissingMppError(
                "plain images (PNG/JPEG/TIFF tiles) carry no trustworthy microscope scale (their dpi tags "
                f"are screen values); pass µm/px explicitly with --mpp-override ({MPP_MIN}-{MPP_MAX})",
                slide=name,
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._img = Image.open(self.path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SlideTooLargeError(f"image is too large to decode safely ({exc})", slide=name) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptSlideError(f"image cannot be opened ({exc})", slide=name) from exc
        w, h = self._img.size
        try:
            check_dimensions([(w, h)], max_side, name)
            if w * h > MAX_IMAGE_PIXELS:
                raise SlideTooLargeError(
                    f"plain image of {w}x{h} px is too large; convert it to a tiled pyramidal TIFF", slide=name
                )
            if getattr(self._img, "n_frames", 1) > 1:
                raise UnsupportedFormatError("multi-page image; expected a single RGB tile", slide=name)
        except Exception:
            self._img.close()
            raise
        self.vendor = (self._img.format or "image").lower()
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.associated_names = ()
        self.mpp = override_mpp(mpp_override)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                try:
                    self._img.load()
                    img = self._img
                    if img.mode not in ("RGB", "RGBA", "L", "LA"):
                        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
                    self._pixels = to_rgb(np.asarray(img))
                except (OSError, SyntaxError, ValueError) as exc:
                    raise CorruptSlideError(f"image cannot be decoded ({exc})", slide=self.path.name) from exc
                finally:
                    self._img.close()
            return self._pixels

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y, level, w, h = check_region(location, level, size, self.level_count, self.path.name)
        pix = self._load()
        out = white(h, w)
        iw, ih = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pix[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._img.close()
