"""Patch coordinates (and features) in the CLAM/TRIDENT HDF5 layout that MIL code already reads.

Dataset `coords` int64 [N, 2] (level-0 top-left x, y) and optional `features` float32 [N, D] in the same row
order. The geometry attributes live on `coords` (where CLAM and TRIDENT put them) and are mirrored on the file
root. Files are written to a temporary sibling and renamed into place, so a reader never sees half a file and
a crashed job leaves no truncated output behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from service.atomic import atomic_path
from service.errors import InvalidParameterError, MstarError

if TYPE_CHECKING:
    from service.slides.grid import TileGrid

FORMAT_VERSION = 1


def grid_attrs(grid: TileGrid, name: str | None = None) -> dict[str, Any]:
    """The geometry attributes for `grid` (DESIGN.md contract + CLAM-compatible names)."""
    lw = round(grid.level0_width / grid.level_downsample)
    lh = round(grid.level0_height / grid.level_downsample)
    attrs: dict[str, Any] = {
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "step_size_level0": int(grid.step_level0),
        "target_mpp": float(grid.target_mpp),
        "effective_mpp": float(grid.effective_mpp),
        "mpp": float(grid.mpp),
        "read_level": int(grid.read_level),
        "read_size": int(grid.read_size),
        "level0_width": int(grid.level0_width),
        "level0_height": int(grid.level0_height),
        "mpp_source": str(grid.mpp_source),
        "overlap": int(grid.overlap),
        "tissue_threshold": float(grid.tissue_threshold),
        # CLAM names: the pyramid level read, its downsample and its size.
        "patch_level": int(grid.read_level),
        "downsample": np.array([grid.level_downsample, grid.level_downsample], dtype=np.float64),
        "level_dim": np.array([lw, lh], dtype=np.int64),
        "downsampled_level_dim": np.array([lw, lh], dtype=np.int64),
        "format_version": FORMAT_VERSION,
    }
    if name is not None:
        attrs["name"] = str(name)
    return attrs


def write_h5(
    path: str | Path,
    grid: TileGrid,
    features: np.ndarray | None = None,
    extra_attrs: dict[str, Any] | None = None,
    *,
    name: str | None = None,
) -> Path:
    """Write `coords` (+ `features`) atomically to `path`; returns the path."""
    path = Path(path)
    coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != coords.shape[0]:
            raise InvalidParameterError(
                f"features must be [N, D] with N = {coords.shape[0]} coordinates, got {features.shape}"
            )
    attrs = grid_attrs(grid, name=name)
    attrs.update(extra_attrs or {})
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunk_rows = max(1, min(len(coords), 4096))
        ds = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(chunk_rows, 2))
        if features is not None:
            f.create_dataset("features", data=features, chunks=True)
        for key, value in attrs.items():
            ds.attrs[key] = value
            f.attrs[key] = value
    return path


def read_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """`(coords int64 [N, 2], features float32 [N, D] or None, attrs)` from a file written here, by CLAM or
    by TRIDENT (attributes on `coords` win over root attributes)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise MstarError(f"{path.name}: no 'coords' dataset (not a patch/feature file)")
            coords = np.asarray(f["coords"][...], dtype=np.int64)
            features = np.asarray(f["features"][...], dtype=np.float32) if "features" in f else None
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items()})
    except OSError as err:
        raise MstarError(f"{path.name}: cannot read HDF5 ({err})") from None
    if features is not None and features.shape[0] != coords.shape[0]:
        raise MstarError(f"{path.name}: {features.shape[0]} feature rows for {coords.shape[0]} coordinates")
    return coords, features, attrs


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
