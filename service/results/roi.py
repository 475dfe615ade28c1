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
    if kind == "Feature":  # a Feature without geometry (RFC 7946 allows it) encloses nothing
        geometry = obj.get("geometry")
        return [] if geometry is None else _geometries(geometry, depth + 1)
    if kind == "GeometryCollection":
        return _geometries(obj.get("geometries") or [], depth + 1)
    if kind in ("Polygon", "MultiPolygon"):
        _check_numbers(obj.get("coordinates"), 0)
        return [obj]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []  # QuPath exports may hold points or lines next to the region; they enclose no area
    raise InvalidParameterError(f"the region has an unknown GeoJSON type {kind!r}")


def _check_numbers(node: Any, depth: int) -> None:
    """Coordinates are JSON numbers: shapely took "0" and true as 0 and 1 without a word."""
    if depth > 4:
        raise InvalidParameterError("the region's coordinates nest too deeply")
    if isinstance(node, list):
        for item in node:
            _check_numbers(item, depth + 1)
    elif isinstance(node, bool) or not isinstance(node, int | float):
        raise InvalidParameterError(f"the region's coordinates must be numbers, not {type(node).__name__} values")


MAX_COORDINATE = 1e7  # level-0 px: ten times the widest scanned slide


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
        for part in parts:
            _check_simple(part)
        region = shapely.union_all(parts)  # overlapping parts (several annotations) merge
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ShapelyError) as err:
        raise InvalidParameterError(f"the region's coordinates are not a valid polygon ({err})") from None
    if region.is_empty or region.area <= 0 or not np.isfinite(region.bounds).all():
        raise InvalidParameterError("the region encloses no area")
    if not np.isfinite(region.area) or np.abs(region.bounds).max() > MAX_COORDINATE:
        # 1e300 corners passed as finite, and the job then wrote an area of Infinity into its result
        raise InvalidParameterError(
            f"the region's coordinates reach {np.abs(region.bounds).max():.3g} px: level-0 pixel coordinates of a "
            f"slide are below {MAX_COORDINATE:.0e}"
        )
    return region


def _check_simple(part: BaseGeometry) -> None:
    """Refuse a polygon whose outline crosses itself (or a hole outside its shell): which side of a bow-tie is
    "inside" is a guess, and repairing it silently would analyse patches the user did not mean. QuPath writes
    valid polygons, so its exports pass as they are."""
    import shapely

    if part.is_empty or part.convex_hull.area <= 0 or not np.isfinite(part.bounds).all():
        raise InvalidParameterError("the region encloses no area")
    if not part.is_valid:
        reason = shapely.is_valid_reason(part)
        raise InvalidParameterError(
            f"the region is not a simple polygon ({reason}): an outline must not cross itself, and holes must lie "
            "inside their outline; redraw it"
        )


def load_region_file(path: str | Path) -> dict:
    """The JSON of a region file (e.g. a QuPath GeoJSON export), checked by `parse_region`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidParameterError(f"{path.name}: not a readable GeoJSON file ({err})") from None
    parse_region(obj)
    return obj


def check_on_slide(region: BaseGeometry, width: int, height: int) -> None:
    """Refuse a region that does not overlap the slide's level-0 image (a region in another unit, e.g. µm or a
    downsampled image's pixels, usually lands outside); one reaching past an edge is fine."""
    from shapely.geometry import box

    if not region.intersection(box(0, 0, width, height)).area > 0:
        minx, miny, maxx, maxy = region.bounds
        raise InvalidParameterError(
            f"the region (bounds {minx:.0f},{miny:.0f}-{maxx:.0f},{maxy:.0f}) lies outside the slide "
            f"({width}x{height} level-0 px); regions are in level-0 pixel coordinates"
        )


def restrict_grid(grid: TileGrid, region_geojson: Any) -> TileGrid:
    """The grid's patches whose centre lies inside the region, in the same order (nothing is read here)."""
    import shapely

    region = parse_region(region_geojson)
    check_on_slide(region, grid.level0_width, grid.level0_height)
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
