"""OpenSlide (libopenslide from `openslide-bin`): SVS, NDPI, MRXS, generic tiled TIFF and more.

OpenSlide handles are thread-safe and release the GIL while decoding, so one reader serves a thread pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from service.errors import CorruptSlideError, SlideError, UnsupportedFormatError
from service.slides.base import SlideReader
from service.slides.mpp import from_openslide_properties
from service.slides.readers._common import check_dimensions, check_region, to_rgb


class OpenSlideReader(SlideReader):
    def __init__(self, path: str | Path, *, max_side: int = 200_000) -> None:
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(f"OpenSlide cannot read this file ({exc})", slide=self.path.name) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise CorruptSlideError(f"file is damaged or incomplete ({exc})", slide=self.path.name) from exc
        try:
            props = self._slide.properties
            self.properties: dict[str, str] = dict(props)
            self.vendor = props.get("openslide.vendor", "unknown")
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            self.associated_names = tuple(self._slide.associated_images.keys())
        except openslide.OpenSlideError as exc:
            self._slide.close()
            raise CorruptSlideError(f"metadata cannot be read ({exc})", slide=self.path.name) from exc
        try:
            check_dimensions(list(self.level_dimensions), max_side, self.path.name)
        except SlideError:
            self._slide.close()
            raise
        self.mpp = from_openslide_properties(props)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y, level, w, h = check_region(location, level, size, self.level_count, self.path.name)
        try:
            img = self._slide.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(f"pixels cannot be decoded ({exc})", slide=self.path.name) from exc
        # OpenSlide returns un-premultiplied RGBA with alpha 0 outside the slide: composite onto white.
        return to_rgb(np.asarray(img))

    def read_associated(self, name: str, *, allow_phi: bool = False) -> np.ndarray:
        if name not in self.associated_names or (name in ("label", "macro") and not allow_phi):
            return super().read_associated(name, allow_phi=allow_phi)
        try:
            img = self._slide.associated_images[name]
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(
                f"associated image {name!r} cannot be decoded ({exc})", slide=self.path.name
            ) from exc
        return to_rgb(np.asarray(img))

    def close(self) -> None:
        self._slide.close()
