"""A region of interest drawn by a user (QuPath export accepted as is) and the grid filter that applies it.

A patch belongs to the region when its centre lies inside the polygon: the rule QuPath itself uses to assign
detections to an annotation, and one that is independent of the patch size. Patches outside are dropped from
the grid before any pixel is read, so their tiles are never decoded.

Accepted input (level-0 pixel coordinates, as QuPath writes them): a GeoJSON geometry (Polygon,
MultiPolygon), a Feature, a FeatureCollection or a bare list of Features (QuPath's "Export objects" writes
either, depending on the version); every polygonal geometry found is united.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import InvalidParameterError, NoTissueError

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from service.slides.grid import TileGrid

MAX_VERTICES = 200_000  # a hand-drawn region has hundreds; this bounds the cost of a hostile request


def _geometries(obj: Any, depth: int = 0) -> list[dict]:
    """Every geometry object inside a GeoJSON value (geometry, Feature, FeatureCollection or list of them)."""
    if depth > 4:
        raise InvalidParameterError("the region's GeoJSON nests too deeply")
    if isinstance(obj, list):
        return [g for item in obj for g in _geometries(item, depth + 1)]
    if not isinstance(obj, dict):
        raise InvalidParameterError("the region must be GeoJSON: a Polygon, a Feature or a FeatureCollection")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _geometries(obj.get("features") or [], depth + 1)
    if kind == "Feature":
        return _geometries(obj.get("geometry"), depth + 1)
    if kind == "GeometryCollection":
        return _geometries(obj.get("geometries") or [], depth + 1)
    if kind in ("Polygon", "MultiPolygon"):
        return [obj]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []  # QuPath exports may hold points or lines next to the region; they enclose no area
    raise InvalidParameterError(f"the region has an unknown GeoJSON type {kind!r}")


def parse_region(obj: Any) -> BaseGeometry:
    """A valid shapely (Multi)Polygon from GeoJSON; a clear error for anything that encloses no area."""
    import shapely
    from shapely.errors import ShapelyError
    from shapely.geometry import shape

    geoms = _geometries(obj)
    if not geoms:
        raise InvalidParameterError("the region holds no Polygon or MultiPolygon")
    try:
        parts = [shape(g) for g in geoms]
        n_vertices = sum(shapely.get_num_coordinates(p) for p in parts)
        if n_vertices > MAX_VERTICES:
            raise InvalidParameterError(f"the region has {n_vertices} vertices (limit {MAX_VERTICES})")
        region = shapely.make_valid(shapely.union_all([shapely.make_valid(p) for p in parts]))
        region = shapely.union_all([g for g in getattr(region, "geoms", [region]) if g.area > 0] or [region])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ShapelyError) as err:
        raise InvalidParameterError(f"the region's coordinates are not a valid polygon ({err})") from None
    if region.is_empty or region.area <= 0 or not np.isfinite(region.bounds).all():
        raise InvalidParameterError("the region encloses no area")
    return region


def load_region_file(path: str | Path) -> dict:
    """The JSON of a region file (e.g. a QuPath GeoJSON export), checked by `parse_region`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidParameterError(f"{path.name}: not a readable GeoJSON file ({err})") from None
    parse_region(obj)
    return obj


def restrict_grid(grid: TileGrid, region_geojson: Any) -> TileGrid:
    """The grid's patches whose centre lies inside the region, in the same order (nothing is read here)."""
    import shapely

    region = parse_region(region_geojson)
    minx, miny, maxx, maxy = region.bounds
    if maxx <= 0 or maxy <= 0 or minx >= grid.level0_width or miny >= grid.level0_height:
        raise InvalidParameterError(
            f"the region (bounds {minx:.0f},{miny:.0f}-{maxx:.0f},{maxy:.0f}) lies outside the slide "
            f"({grid.level0_width}x{grid.level0_height} level-0 px); regions are in level-0 pixel coordinates"
        )
    half = grid.patch_size_level0 / 2.0
    centres = np.asarray(grid.coords, np.float64) + half
    keep = shapely.contains_xy(region, centres[:, 0], centres[:, 1]) if len(centres) else np.zeros(0, bool)
    if not keep.any():
        raise NoTissueError(
            f"none of the {len(grid)} tissue patches has its centre inside the region; draw the region over tissue"
        )
    return dataclasses.replace(
        grid,
        coords=np.ascontiguousarray(grid.coords[keep]),
        tissue_fraction=np.ascontiguousarray(grid.tissue_fraction[keep]),
        region=region,
        region_info={
            "bounds_level0": [round(float(v), 1) for v in region.bounds],
            "area_level0_px": round(float(region.area), 1),
            "tissue_patches_before": len(grid),
            "rule": "patch centre inside the region",
        },
    )
