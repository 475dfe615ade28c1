"""QuPath GeoJSON, region-of-interest analysis and heatmaps re-rendered from saved scores, on the real CMU slide
with the tiny exported bundle (real ONNX models)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from inference_fixtures import build_tiny_bundle
from PIL import Image
from shapely.geometry import box, shape

from service.cli import main
from service.errors import InvalidParameterError, NoTissueError
from service.pipeline import AnalysisOptions, run_analysis
from service.results import geojson as gj
from service.results import patch_scores
from service.results.roi import parse_region
from service.slides.fasttiles import FastTiffSource
from service.slides.stream import PatchReader

# QuPath's GeoJSON conventions, as its importer reads them (objectType, classification, measurements).
QUPATH_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {"type": {"enum": ["Polygon", "MultiPolygon"]}},
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType"],
                        "properties": {
                            "objectType": {"enum": ["annotation", "detection"]},
                            "name": {"type": "string"},
                            "isLocked": {"type": "boolean"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "color": {
                                        "type": "array",
                                        "minItems": 3,
                                        "maxItems": 3,
                                        "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                    },
                                },
                            },
                            "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def analysed(tiny_bundle: Path, cmu_svs: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    run_analysis(cmu_svs, out, AnalysisOptions(), bundle_dir=tiny_bundle)
    return out


def _detections(fc: dict) -> list[dict]:
    return [f for f in fc["features"] if f["properties"]["objectType"] == "detection"]


def test_geojson_follows_qupath_conventions_and_matches_the_result(analysed: Path) -> None:
    import jsonschema

    fc = gj.build_from_dir(analysed)
    jsonschema.validate(fc, QUPATH_SCHEMA)
    result = json.loads((analysed / "result.json").read_text())
    with h5py.File(analysed / "features.h5", "r") as f:
        coords = f["coords"][:]
        size = int(f["coords"].attrs["patch_size_level0"])
    dets = _detections(fc)
    assert len(dets) == len(coords) == result["tiling"]["patches"]
    # Geometry: each detection is exactly its grid square, in level-0 pixels.
    for det, (x, y) in zip(dets, coords, strict=True):
        poly = shape(det["geometry"])
        assert poly.is_valid and poly.equals(box(x, y, x + size, y + size))
    # Tissue: one locked annotation, valid, covering the patches' tissue.
    tissue = [f for f in fc["features"] if f["properties"].get("name") == "Tissue"]
    assert len(tissue) == 1 and tissue[0]["properties"]["objectType"] == "annotation"
    outline = shape(tissue[0]["geometry"])
    assert outline.is_valid and outline.area > 0
    w, h = result["slide"]["level_dimensions"][0]
    assert box(0, 0, w, h).buffer(1).contains(outline)
    patches = shapely.union_all([shape(d["geometry"]) for d in dets])
    assert outline.intersection(patches).area / patches.area > 0.5  # patches hold >= 25 % tissue each
    # Values: slide-level numbers equal result.json; patch attention equals the aggregator's top patches.
    meas = tissue[0]["properties"]["measurements"]
    for head, v in result["classification"].items():
        for label, p in v["probabilities"].items():
            assert meas[f"{head}: {label} probability (slide)"] == pytest.approx(p, abs=1e-6)
    for head, v in result["survival"].items():
        assert meas[f"{head}: risk (slide)"] == pytest.approx(v["risk"], abs=1e-6)
    by_xy = {(int(x), int(y)): d["properties"]["measurements"] for d, (x, y) in zip(dets, coords, strict=True)}
    for top in result["attention"]["top_patches"]:
        assert by_xy[(top["x"], top["y"])]["Attention"] == pytest.approx(top["score"], abs=1e-6)
    best = max(by_xy.items(), key=lambda kv: kv[1]["Attention"])[1]
    assert best["Attention (normalised)"] == pytest.approx(1.0)
    # Per-class scores: a distribution per patch, and the detection is classified as its most probable class.
    head = next(iter(result["classification"]))
    labels = list(result["classification"][head]["probabilities"])
    for det in dets:
        m = det["properties"]["measurements"]
        probs = [m[f"{head}: {lab} probability"] for lab in labels]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert det["properties"]["classification"]["name"] == labels[int(np.argmax(probs))]


def _left_half_of_tissue(analysed: Path) -> tuple[dict, np.ndarray, int]:
    scores = patch_scores.read(analysed / patch_scores.FILE_NAME)
    c, s = scores.coords, scores.patch_size_level0
    x0, y0 = (float(v) for v in c.min(axis=0))
    _, y1 = (float(v) for v in c.max(axis=0) + s)
    mid = float(np.median(c[:, 0] + s / 2))
    ring = [[x0 - 5, y0 - 5], [mid, y0 - 5], [mid, y1 + 5], [x0 - 5, y1 + 5], [x0 - 5, y0 - 5]]
    # As QuPath's "Export objects" writes an annotation.
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "b5b1c2de-0000-4000-8000-000000000001",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
            }
        ],
    }
    return fc, c, s


def test_roi_reads_only_patches_inside_the_polygon(analysed, tiny_bundle, cmu_svs, tmp_path, monkeypatch) -> None:
    region, full_coords, size = _left_half_of_tissue(analysed)
    roi_file = tmp_path / "region.geojson"
    roi_file.write_text(json.dumps(region))
    read: list[np.ndarray] = []
    sources: set = set()
    real_read = PatchReader.read_batch

    def recording(self, start: int, stop: int, out=None) -> np.ndarray:  # observe the real reader, change nothing
        read.append(np.array(self.grid.coords[start:stop]))
        sources.add(self.fast_source)
        return real_read(self, start, stop, out)

    monkeypatch.setattr(PatchReader, "read_batch", recording)
    decoded: list[tuple[FastTiffSource, tuple[int, int]]] = []  # every stored slide tile decoded for a patch
    real_load = FastTiffSource._load

    def loading(self, key: tuple[int, int]) -> np.ndarray:
        decoded.append((self, key))
        return real_load(self, key)

    monkeypatch.setattr(FastTiffSource, "_load", loading)
    out = tmp_path / "roi"
    res = CliRunner().invoke(
        main,
        ["analyze", str(cmu_svs), "--bundle", str(tiny_bundle), "--out", str(out), "--roi", str(roi_file), "--geojson"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    read_xy = np.concatenate(read)
    poly = parse_region(region)
    centres = full_coords + size / 2
    inside = shapely.contains_xy(poly, centres[:, 0], centres[:, 1])
    assert 0.3 < inside.mean() < 0.7  # the polygon covers about half the tissue
    # Exactly the tissue patches centred inside were read, each once; none outside.
    assert sorted(map(tuple, read_xy.tolist())) == sorted(map(tuple, full_coords[inside].tolist()))
    # Below the patch reader: the full-resolution tiles it decoded are exactly those the inside patches cover, each
    # once; the tiles only outside patches cover were never decoded. (The tissue mask and the heatmap's backdrop
    # read a thumbnail of the whole slide through their own reader, as every analysis does.)
    assert len(sources) == 1 and None not in sources  # the CMU slide's JPEG tiles are cut on the fast path
    src = next(iter(sources))
    keys = [k for s_, k in decoded if s_ is src]
    tiles_inside = {k for per in src.tiles_of(full_coords[inside], size) for k in per}
    tiles_all = {k for per in src.tiles_of(full_coords, size) for k in per}
    assert len(keys) == len(set(keys)) and set(keys) == tiles_inside
    assert len(tiles_all - tiles_inside) >= 0.3 * len(tiles_all)
    result = json.loads((out / "result.json").read_text())
    assert result["tiling"]["patches"] == int(inside.sum())
    assert result["tiling"]["region"]["tissue_patches_before"] == len(full_coords)
    fc = json.loads((out / "annotations.geojson").read_text())
    roi = [f for f in fc["features"] if f["properties"].get("name") == "Region of interest"]
    assert len(roi) == 1 and shape(roi[0]["geometry"]).equals(poly)
    tissue = next(f for f in fc["features"] if f["properties"].get("name") == "Tissue")
    assert poly.buffer(1).contains(shape(tissue["geometry"]))  # the outline is clipped to the region
    assert len(_detections(fc)) == int(inside.sum())


def test_bad_regions_are_refused_clearly(analysed, cmu_svs, tiny_bundle, tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="no Polygon"):
        AnalysisOptions(region={"type": "Point", "coordinates": [1, 2]})
    with pytest.raises(InvalidParameterError, match="no area"):
        AnalysisOptions(region={"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 0]]]})
    with pytest.raises(InvalidParameterError, match="GeoJSON"):
        AnalysisOptions(region="left half")
    far = {"type": "Polygon", "coordinates": [[[1e6, 1e6], [2e6, 1e6], [2e6, 2e6], [1e6, 1e6]]]}
    with pytest.raises(InvalidParameterError, match="outside the slide"):
        run_analysis(cmu_svs, tmp_path / "far", AnalysisOptions(region=far), bundle_dir=tiny_bundle)
    corner = {"type": "Polygon", "coordinates": [[[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]]}  # background only
    with pytest.raises(NoTissueError, match="inside the region"):
        run_analysis(cmu_svs, tmp_path / "corner", AnalysisOptions(region=corner), bundle_dir=tiny_bundle)
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    res = CliRunner().invoke(main, ["analyze", str(cmu_svs), "--bundle", str(tiny_bundle), "--roi", str(bad)])
    assert res.exit_code == 2 and "not a readable GeoJSON" in res.output
    # The CLI says why for a bow-tie (before anything runs) and for a region off the slide.
    for region, why in (
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [900, 900], [900, 0], [0, 900], [0, 0]]]},
            "not a simple polygon",
        ),
        (far, "outside the slide"),
    ):
        bad.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": region}]}))
        res = CliRunner().invoke(
            main,
            ["analyze", str(cmu_svs), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o"), "--roi", str(bad)],
        )
        assert res.exit_code == 2 and why in res.output, res.output


def test_heatmap_rerendered_at_any_level_from_saved_scores(analysed: Path, cmu_svs: Path) -> None:
    result = json.loads((analysed / "result.json").read_text())
    dims = result["slide"]["level_dimensions"]
    scores = patch_scores.read(analysed / patch_scores.FILE_NAME)
    s = scores.patch_size_level0
    runner = CliRunner()
    for level in range(len(dims)):
        res = runner.invoke(main, ["heatmap", str(analysed), "--level", str(level)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        img = np.asarray(Image.open(analysed / f"heatmap-level{level}.png"))
        assert img.shape == (dims[level][1], dims[level][0], 4)
        ds = dims[0][0] / dims[level][0]
        # The top-attention patch is the top of the colour map; the slide's corner was not analysed.
        top = scores.coords[int(np.argmax(scores.attention))]
        cy, cx = int((top[1] + s / 2) / ds), int((top[0] + s / 2) / ds)
        from matplotlib import colormaps

        assert np.abs(img[cy, cx, :3].astype(int) - np.array(colormaps["inferno"](1.0)[:3]) * 255).max() <= 1
        assert img[cy, cx, 3] > 0
        covered = np.zeros(img.shape[:2], bool)
        for x, y in scores.coords:
            covered[int(y / ds) + 1 : int((y + s) / ds) - 1, int(x / ds) + 1 : int((x + s) / ds) - 1] = True
        assert (img[..., 3][covered] > 0).all()
    assert (img[..., 3] == 0).any()  # background stays transparent
    res = runner.invoke(
        main,
        [
            "heatmap",
            str(analysed),
            "--level",
            "0",
            "--slide",
            str(cmu_svs),
            "--score",
            "subtype.luad",
            "--out",
            str(analysed / "blend.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    blend = np.asarray(Image.open(analysed / "blend.png"))
    assert blend.shape == (dims[0][1], dims[0][0], 4) and (blend[..., 3] == 255).all()
    res = runner.invoke(main, ["heatmap", str(analysed), "--level", "9"])
    assert res.exit_code == 2 and "level must be" in res.output
    res = runner.invoke(main, ["heatmap", str(analysed), "--score", "nope"])
    assert res.exit_code == 2 and "choose from" in res.output


def test_tiled_tiff_heatmap_equals_the_png_and_is_a_pyramid(analysed: Path, cmu_svs: Path, monkeypatch) -> None:
    """`--format tiff` renders the same pixels as the PNG path, tile by tile, into a tiled pyramidal BigTIFF;
    `auto` switches to it where the level is over the one-image limit, which the PNG path refuses by name."""
    import tifffile

    from service.results import heatmap_levels as hl

    dims = json.loads((analysed / "result.json").read_text())["slide"]["level_dimensions"]
    runner = CliRunner()
    res = runner.invoke(main, ["heatmap", str(analysed), "--level", "0", "--format", "png"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(analysed / "heatmap-level0.png"))
    res = runner.invoke(main, ["heatmap", str(analysed), "--level", "0", "--format", "tiff"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tiff"] == str(analysed / "heatmap-level0.tif")
    with tifffile.TiffFile(analysed / "heatmap-level0.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilewidth, page.tilelength) == (512, 512)
        assert page.shape == (dims[0][1], dims[0][0], 4) and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(page.asarray(), png)
        subs = tif.series[0].levels[1:]  # the SubIFDs
        w, h = dims[0]
        assert [s.shape[:2] for s in subs] == [(h // 2, w // 2), (h // 4, w // 4)]
        for sub in subs:  # each reduced resolution is the map rendered at that size, not a resample
            size = (sub.shape[1], sub.shape[0])
            scores = patch_scores.read(analysed / patch_scores.FILE_NAME)
            values, covered = hl.normalised_map(scores, scores.attention, tuple(dims[0]), size)
            np.testing.assert_array_equal(sub.asarray(), hl._colour(values, covered, "inferno", 0.6, None))
    for fmt in ("png", "tiff"):  # blended over the slide, tile by tile: the same pixels as one whole read
        args = ["heatmap", str(analysed), "--level", "0", "--slide", str(cmu_svs), "--format", fmt]
        res = runner.invoke(main, [*args, "--out", str(analysed / f"blend0.{fmt}")], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    blended = tifffile.imread(analysed / "blend0.tiff")
    np.testing.assert_array_equal(blended, np.asarray(Image.open(analysed / "blend0.png")))
    assert (blended[..., 3] == 255).all()
    monkeypatch.setattr(hl, "MAX_PIXELS", 1_000_000)
    res = runner.invoke(main, ["heatmap", str(analysed), "--level", "0", "--format", "png"])
    assert res.exit_code == 2 and "--format tiff" in res.output
    res = runner.invoke(main, ["heatmap", str(analysed), "--level", "0", "--out", str(analysed / "big.tif")])
    assert res.exit_code == 0 and "tiff" in json.loads(res.output)


def test_tiled_tiff_heatmap_of_a_40x_sized_level_stays_small_in_memory(tmp_path: Path) -> None:
    """A level the size of a 40x slide's level 0 (here 40,960 x 30,720 px: 1.26 G px, 5 GB as one RGBA array)
    is written with a few tiles in memory; the tiles under patches carry their scores, the rest are
    transparent."""
    import tracemalloc
    import zlib

    import tifffile

    from service.results import heatmap_levels as hl
    from service.results.patch_scores import PatchScores

    w, h, s = 40_960, 30_720, 512
    xs, ys = np.meshgrid(np.arange(20_000, 24_096, s), np.arange(10_240, 12_288, s))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    attention = np.linspace(0.0, 1.0, len(coords))
    scores = PatchScores(coords=coords, attrs={"patch_size_level0": s}, attention=attention)
    dims = [[w, h], [w // 4, h // 4]]
    tracemalloc.start()
    hl.write_tiled_tiff(tmp_path / "big.tif", scores, dims, 0, tile=1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 128 << 20, f"peak {peak / 2**20:.0f} MiB"  # one array would be 5,000 MiB
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        page = tif.pages[0]
        assert page.shape == (h, w, 4) and len(tif.series[0].levels) >= 5

        def tile(tx: int, ty: int) -> np.ndarray:
            i = ty * (w // 1024) + tx
            tif.filehandle.seek(page.dataoffsets[i])
            return np.frombuffer(zlib.decompress(tif.filehandle.read(page.databytecounts[i])), np.uint8).reshape(
                1024, 1024, 4
            )

        assert not tile(0, 0)[..., 3].any()  # no patch there: transparent
        last = tile(23, 11)  # holds the last (highest-attention) patch, [23,552, 24,064) x [11,776, 12,288)
        np.testing.assert_array_equal(last[512:, 23_552 - 23_552 : 512, 3], round(0.6 * 255))
        from matplotlib import colormaps

        top = (np.array(colormaps["inferno"](1.0)[:3]) * 255).round()
        assert np.abs(last[600, 100, :3].astype(int) - top).max() <= 1


def _ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_region_shapes_are_accepted_as_exported(cmu_svs: Path) -> None:
    """Every shape QuPath's "Export objects" writes selects exactly the patches centred inside its area: a bare
    geometry, a Feature, a FeatureCollection, a list of Features (QuPath 0.2 style: `colorRGB`, measurements as a
    list), a Polygon with a hole (patches in the hole are left out) and a MultiPolygon; points and lines next to
    the region are ignored."""
    from service.results.roi import restrict_grid
    from service.slides.grid import build_grid
    from service.slides.open import open_slide

    with open_slide(cmu_svs) as reader:
        grid = build_grid(reader, target_mpp=0.5, patch_size=224)
    c, s = grid.coords.astype(float), grid.patch_size_level0
    x0, y0 = c.min(axis=0)
    x1, y1 = c.max(axis=0) + s
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    shell = _ring(x0 - 1, y0 - 1, x1 + 1, y1 + 1)
    hole = _ring(xm - 2 * s + 7, ym - 2 * s + 7, xm + 2 * s + 7, ym + 2 * s + 7)  # no centre on its edge
    holed = {"type": "Polygon", "coordinates": [shell, hole]}
    two = {"type": "MultiPolygon", "coordinates": [[_ring(x0 - 1, y0 - 1, xm, ym)], [_ring(xm, ym, x1 + 1, y1 + 1)]]}
    feature = {
        "type": "Feature",
        "id": "0b7f3f7e-1c1e-4a4e-9d6f-2f0c9b1b2a11",
        "geometry": holed,
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    }
    old_style = {
        "type": "Feature",
        "id": "PathAnnotationObject",
        "geometry": two,
        "properties": {
            "classification": {"name": "Stroma", "colorRGB": -3670016},
            "isLocked": False,
            "measurements": [],
        },
    }
    point = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[xm, ym]]}, "properties": {}}
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[x0, y0], [x1, y1]]}}
    centres = c + s / 2

    def expected(geom) -> np.ndarray:
        return c[shapely.contains_xy(shape(geom), centres[:, 0], centres[:, 1])]

    cases = {
        "bare geometry": (holed, holed),
        "Feature": (feature, holed),
        "FeatureCollection with a point and a line": (
            {"type": "FeatureCollection", "features": [point, feature, line]},
            holed,
        ),
        "list of Features (QuPath 0.2)": ([old_style, point], two),
        "MultiPolygon": (two, two),
    }
    for name, (region, geom) in cases.items():
        got = restrict_grid(grid, region).coords
        want = expected(geom)
        assert 0 < len(want) <= len(c) and np.array_equal(got, want), name
    in_hole = shapely.contains_xy(shape({"type": "Polygon", "coordinates": [hole]}), centres[:, 0], centres[:, 1])
    assert in_hole.sum() >= 4 and len(restrict_grid(grid, holed)) == len(c) - in_hole.sum()
    assert len(restrict_grid(grid, two)) < len(c)  # the MultiPolygon's two quarters leave the other two out


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]},
            "not a simple polygon",
        ),  # a bow-tie: its outline crosses itself
        (
            {"type": "Polygon", "coordinates": [_ring(0, 0, 100, 100), _ring(200, 200, 300, 300)]},
            "not a simple polygon",
        ),  # a hole outside its shell
        ({"type": "Polygon", "coordinates": []}, "no area"),
        ({"type": "FeatureCollection", "features": []}, "no Polygon"),
        ({"type": "LineString", "coordinates": [[0, 0], [100, 100]]}, "no Polygon"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [100, 0], [0, 0]]]}, "no area"),
        ({"type": "Polygon", "coordinates": [[[0, 0], ["a", 0], [1, 1], [0, 0]]]}, "must be numbers, not str"),
        # shapely read "0" and true as numbers without a word
        ({"type": "Polygon", "coordinates": [[[0, 0], ["100", 0], [100, 100], [0, 0]]]}, "must be numbers, not str"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [100, True], [100, 100], [0, 0]]]}, "must be numbers, not bool"),
        ({"type": "Circle", "coordinates": [0, 0]}, "unknown GeoJSON type"),
        # corners at 1e300: finite, but the job wrote an area of Infinity into its result (invalid JSON)
        ({"type": "Polygon", "coordinates": [_ring(-1e300, -1e300, 1e300, 1e300)]}, "coordinates reach 1e\\+300"),
        ({"type": "Polygon", "coordinates": [_ring(0, 0, 100, 2e7)]}, "below 1e\\+07"),
    ],
)
def test_bad_region_shapes_say_why(region, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        parse_region(region)


def test_heatmap_colouring_keeps_matplotlib_s_pixels_in_a_fraction_of_the_memory() -> None:
    """Colouring a level went through float64 RGBA from matplotlib and float32 copies: about 56 bytes a pixel
    (a 64 MP level took 3.8 GB in the gateway, and any tenant could ask for one). The colour table is now indexed
    as matplotlib indexes it, in bands of rows: the same pixels, a few bytes a pixel."""
    import tracemalloc

    from matplotlib import colormaps

    from service.results.heatmap_levels import _colour

    rng = np.random.default_rng(3)
    values = rng.random((600, 700), dtype=np.float32)
    values.flat[:257] = (np.arange(257) / 256).astype(np.float32)  # every bin edge, 1.0 included
    covered = rng.random(values.shape) > 0.3
    background = rng.integers(0, 256, (610, 705, 3), dtype=np.uint8)
    for cmap, alpha in (("inferno", 0.6), ("viridis", 1.0)):
        rgb = (colormaps[cmap](values)[..., :3] * 255.0).astype(np.float32)
        a = np.where(covered, alpha, 0.0).astype(np.float32)[..., None]
        plain = np.concatenate([rgb, a * 255.0], axis=2).round().astype(np.uint8)
        over = (background[:600, :700].astype(np.float32) * (1.0 - a) + rgb * a).round().astype(np.uint8)
        assert np.array_equal(_colour(values, covered, cmap, alpha, None), plain)
        blended = _colour(values, covered, cmap, alpha, background)
        assert np.array_equal(blended[..., :3], over) and (blended[..., 3] == 255).all()

    big = rng.random((2000, 2000), dtype=np.float32)
    tracemalloc.start()
    _colour(big, big > 0.5, "inferno", 0.6, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the RGBA output (4 bytes a pixel) plus about a megapixel band of temporaries; was 56 bytes a pixel
    assert peak - 4 * big.size < 64e6, peak


def test_a_lost_or_damaged_patch_score_file_is_said_without_storage_paths(tmp_path: Path) -> None:
    """A missing or truncated patch_scores.h5 answered 422 with the undocumented code `error` and a message holding
    the server's absolute storage path (tenant id included). It is now `result_damaged` naming only the file."""
    from service.errors import ResultDamagedError
    from service.results import patch_scores

    missing = tmp_path / "tenant-x" / "patch_scores.h5"
    with pytest.raises(ResultDamagedError, match="is missing") as err:
        patch_scores.read(missing)
    assert err.value.code == "result_damaged" and "tenant-x" not in str(err.value)
    missing.parent.mkdir()
    missing.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ResultDamagedError, match="not a readable patch score file") as err:
        patch_scores.read(missing)
    assert str(tmp_path) not in str(err.value)
