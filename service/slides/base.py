"""The one slide interface every reader implements, whatever the container.

Coordinates are always level-0 pixels, `(x, y)` top-left; arrays are uint8 RGB `[H, W, 3]`.
Physical scale is µm/px, recorded with where it came from so results can say how much to trust it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

# Values outside this range are not physical (e.g. a 72-dpi TIFF tag) and count as missing.
MPP_MIN = 0.05
MPP_MAX = 20.0


@dataclass(frozen=True)
class Mpp:
    """µm per pixel at level 0 and the metadata it was read from (e.g. `aperio`, `tiff-resolution`,
    `ome`, `dicom-pixel-spacing`, `openslide`, `override`)."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


def plausible_mpp(value: float | None) -> bool:
    return value is not None and np.isfinite(value) and MPP_MIN <= float(value) <= MPP_MAX


class SlideReader(ABC):
    """A whole-slide image opened read-only. Use as a context manager, or call `close()`."""

    path: Path
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, level 0 first
    level_downsamples: tuple[float, ...]
    mpp: Mpp | None  # None when the slide carries no plausible µm/px (callers may override)
    associated_names: tuple[str, ...]  # e.g. ("label", "macro", "thumbnail"); label/macro carry PHI
    format: str = "unknown"  # what `sniff_format` found (svs, ndpi, ome-tiff, tiff, dicom, png, ...)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 `[size[1], size[0], 3]` at `level`, top-left given in level-0 pixels.
        Areas outside the slide come back white (255)."""

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB uint8 image whose longer side is at most `max_size`, from the coarsest adequate level."""
        from service.slides.thumbnail import thumbnail_from_levels

        return thumbnail_from_levels(self, max_size)

    def read_associated(self, name: str, *, allow_phi: bool = False) -> np.ndarray:
        """Associated images; label and macro show patient identity and are refused unless asked for."""
        from service.errors import SlideError

        if name in ("label", "macro") and not allow_phi:
            raise SlideError(
                f"associated image {name!r} may carry patient identity and is not returned", slide=self.path.name
            )
        raise SlideError(f"associated image {name!r} not available", slide=self.path.name)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        """JSON-safe summary (no PHI): what `GET /slides/{id}` and `mstar tile` report."""
        m = self.mpp
        return {
            "vendor": self.vendor,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [float(d) for d in self.level_downsamples],
            "format": self.format,
            "mpp": None if m is None else {"x": m.x, "y": m.y, "source": m.source},
            "associated_images": [n for n in self.associated_names if n not in ("label", "macro")],
        }
