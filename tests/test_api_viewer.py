"""The viewer's API: Deep Zoom tiles (tenant-checked, cached, pyramid only), QuPath GeoJSON and re-rendered
heatmaps of a finished job, and a `region` in the analyses request. Real app, embedded runner, tiny bundle,
the real CMU slide."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_fixtures import build_tiny_bundle
from PIL import Image
from test_results_qupath import QUPATH_SCHEMA

from service.api import create_app
from service.config import Settings
from service.slides.open import open_slide

KEY_A, KEY_B = "viewer-api-a-0123456789abcdef", "viewer-api-b-0123456789abcdef"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


def _wait(c: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}", headers=A).json()
        if job["state"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def served(tmp_path_factory, cmu_svs: Path):
    bundle = build_tiny_bundle(tmp_path_factory.getbasetemp())
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("viewer-api"),
        bundle_dir=bundle,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[{"tenant": "a", "key": KEY_A}, {"tenant": "b", "key": KEY_B}],
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, headers=A)
        assert r.status_code == 202, r.text
        job = _wait(c, r.json()["job"]["id"])
        assert job["state"] == "succeeded", job
        yield c, job


def test_deep_zoom_tiles_are_tenant_checked_cached_and_from_the_pyramid(served, cmu_svs: Path) -> None:
    c, job = served
    sid = job["slide_id"]
    dz = c.get(f"/slides/{sid}/dzi", headers=A).json()
    with open_slide(cmu_svs) as reader:
        w, h = reader.dimensions
        assert (dz["width"], dz["height"]) == (w, h) and dz["maxLevel"] == math.ceil(math.log2(max(w, h)))
        # A full-resolution tile equals the slide's pixels there (JPEG aside).
        r = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/2_3.jpeg", headers=A)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert "private" in r.headers["cache-control"]
        tile = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
        ref = reader.read_region((512, 768), 0, (256, 256)).astype(np.float32)
        assert tile.shape == (256, 256, 3) and np.abs(tile - ref).mean() < 4
        # The coarsest tiles shrink the whole slide: never the label or macro image.
        r = c.get(f"/slides/{sid}/tiles/{dz['maxLevel'] - 4}/0_0.jpeg", headers=A)
        small = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
        assert small.shape[:2] == (math.ceil(h / 16), math.ceil(w / 16))
        thumb = np.asarray(Image.fromarray(reader.read_region((0, 0), 0, (w, h))).resize(small.shape[1::-1]))
        assert np.abs(small - thumb).mean() < 8
    edge = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/8_11.jpeg", headers=A)  # the bottom-right partial tile
    assert Image.open(io.BytesIO(edge.content)).size == (w - 8 * 256, h - 11 * 256)
    tiles = c.app.state.tiles
    hits = tiles.hits
    again = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/2_3.jpeg", headers=A)
    assert again.status_code == 200 and len(again.content) > 0
    assert tiles.hits == hits + 1
    # Revalidation: the tile's ETag answers 304 without rendering or sending it; another tile's ETag does not match,
    # and another tenant (or no key) learns nothing from an ETag.
    etag = again.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    first = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/2_3.jpeg", headers=A).headers["etag"]
    assert first == etag and "immutable" in again.headers["cache-control"]
    misses, hits = tiles.misses, tiles.hits
    for sent in (etag, f"W/{etag}", f'"x", {etag}'):
        nm = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/2_3.jpeg", headers={**A, "If-None-Match": sent})
        assert nm.status_code == 304 and nm.content == b"" and nm.headers["etag"] == etag, sent
        assert "private" in nm.headers["cache-control"]
    assert (tiles.misses, tiles.hits) == (misses, hits)  # nothing rendered or looked up for a 304
    other = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/2_4.jpeg", headers={**A, "If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag
    assert c.get(f"/slides/{sid}/tiles/0/0_0.jpeg", headers={**B, "If-None-Match": "*"}).status_code == 404
    assert c.get(f"/slides/{sid}/tiles/0/0_0.jpeg", headers={"If-None-Match": "*"}).status_code == 401
    stale = c.get(f"/slides/{sid}/tiles/{dz['maxLevel']}/99_0.jpeg", headers={**A, "If-None-Match": "*"})
    assert stale.status_code == 422  # a tile that does not exist is never "not modified"
    for bad in (f"{dz['maxLevel']}/99_0", f"{dz['maxLevel'] + 1}/0_0", "3/a_b", "3/0_0_0"):
        r = c.get(f"/slides/{sid}/tiles/{bad}.jpeg", headers=A)
        assert r.status_code == 422 and r.json()["error"]["message"], bad
    # Another tenant sees nothing, and no key is no tile.
    assert c.get(f"/slides/{sid}/dzi", headers=B).status_code == 404
    assert c.get(f"/slides/{sid}/tiles/0/0_0.jpeg", headers=B).status_code == 404
    assert c.get(f"/slides/{sid}/tiles/0/0_0.jpeg").status_code == 401


def test_geojson_and_heatmap_routes(served) -> None:
    import jsonschema

    c, job = served
    jid = job["id"]
    assert job["links"]["annotations"] == f"/jobs/{jid}/annotations.geojson"
    r = c.get(f"/jobs/{jid}/annotations.geojson", headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "application/geo+json"
    geo, fc = r, r.json()
    jsonschema.validate(fc, QUPATH_SCHEMA)
    result = c.get(f"/jobs/{jid}/result", headers=A).json()
    dets = [f for f in fc["features"] if f["properties"]["objectType"] == "detection"]
    assert len(dets) == result["tiling"]["patches"]
    assert fc["mstar"]["slide_sha256"] == result["slide"]["sha256"]
    dims = result["slide"]["level_dimensions"]
    png = c.get(f"/jobs/{jid}/heatmap", params={"level": 0}, headers=A)
    assert png.status_code == 200 and png.headers["x-pyramid-level"] == "0"
    img = Image.open(io.BytesIO(png.content))
    assert img.mode == "RGBA" and img.size == tuple(dims[0])
    alpha = np.asarray(img)[..., 3]
    assert (alpha == 255).any() and (alpha == 0).any()
    label = next(iter(result["classification"].values()))["label"]
    head = next(iter(result["classification"]))
    assert c.get(f"/jobs/{jid}/heatmap", params={"score": f"{head}.{label}"}, headers=A).status_code == 200
    r = c.get(f"/jobs/{jid}/heatmap", params={"score": "nope"}, headers=A)
    assert r.status_code == 422 and "choose from" in r.json()["error"]["message"]
    assert c.get(f"/jobs/{jid}/heatmap", params={"level": 7}, headers=A).status_code == 422
    # Both views revalidate with their ETag (304, nothing sent); another level's image is another ETag.
    for path, params, resp in (("annotations.geojson", {}, geo), ("heatmap", {"level": 0}, png)):
        tag = resp.headers["etag"]
        nm = c.get(f"/jobs/{jid}/{path}", params=params, headers={**A, "If-None-Match": tag})
        assert nm.status_code == 304 and nm.content == b"" and nm.headers["etag"] == tag, path
        assert c.get(f"/jobs/{jid}/{path}", params=params, headers={**B, "If-None-Match": tag}).status_code == 404
    by_class = {"level": 0, "score": f"{head}.{label}"}
    other = c.get(f"/jobs/{jid}/heatmap", params=by_class, headers={**A, "If-None-Match": png.headers["etag"]})
    assert other.status_code == 200 and other.headers["etag"] != png.headers["etag"]
    bad = c.get(f"/jobs/{jid}/heatmap", params={"level": 7}, headers={**A, "If-None-Match": "*"})
    assert bad.status_code == 422 and "level must be" in bad.json()["error"]["message"]
    for path in ("annotations.geojson", "heatmap"):
        assert c.get(f"/jobs/{jid}/{path}", headers=B).status_code == 404


def test_region_in_the_analyses_request(served) -> None:
    c, job = served
    fc = c.get(f"/jobs/{job['id']}/annotations.geojson", headers=A).json()
    xs = [f["geometry"]["coordinates"][0][0][0] for f in fc["features"] if f["properties"]["objectType"] == "detection"]
    mid = float(np.median(xs))
    region = {"type": "Polygon", "coordinates": [[[0, 0], [mid, 0], [mid, 4000], [0, 4000], [0, 0]]]}
    r = c.post(f"/slides/{job['slide_id']}/analyses", json={"tasks": ["classification"], "region": region}, headers=A)
    assert r.status_code == 202, r.text
    done = _wait(c, r.json()["id"])
    assert done["state"] == "succeeded", done
    res = c.get(f"/jobs/{done['id']}/result", headers=A).json()
    full = len(xs)
    assert 0 < res["tiling"]["patches"] < full and res["tiling"]["region"]["tissue_patches_before"] == full
    jobs_before = c.get("/jobs", params={"limit": 100}, headers=A).json()["items"]
    w, h = res["slide"]["level_dimensions"][0]
    refused = {
        "no Polygon": {"type": "Point", "coordinates": [0, 0]},
        "no Polygon ": {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]},
        "not a simple polygon": {"type": "Polygon", "coordinates": [[[0, 0], [900, 900], [900, 0], [0, 900], [0, 0]]]},
        "no area": {"type": "Polygon", "coordinates": [[[0, 0], [500, 0], [900, 0], [0, 0]]]},
        # in another unit (e.g. µm, or a thumbnail's pixels scaled up): off the slide, refused before any job runs
        "lies outside the slide": {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[w + 10, 0], [w + 900, 0], [w + 900, h], [w + 10, 0]]]},
        },
    }
    for why, region in refused.items():
        bad = c.post(f"/slides/{job['slide_id']}/analyses", json={"region": region}, headers=A)
        assert bad.status_code == 422 and why.strip() in bad.json()["error"]["message"], (why, bad.text)
    assert c.get("/jobs", params={"limit": 100}, headers=A).json()["items"] == jobs_before  # no job was queued


def test_a_reader_evicted_while_tiles_are_read_from_it_stays_open_until_they_are_done(tmp_path, cmu_svs: Path) -> None:
    """Tiles of more slides than the cache keeps open, requested at once, made the cache close a reader another
    request was still reading: OpenSlide then aborted the whole gateway process (`_openslide_tiffcache_destroy:
    assertion failed`). An evicted reader is now closed by its last user."""
    import ctypes
    import threading

    from service.api.tiles import TileCache
    from service.store.blobs import FileBlobStore

    blobs = FileBlobStore(tmp_path / "blobs")
    for i in range(4):
        blobs.put_file(f"s{i}", cmu_svs)
    cache = TileCache(blobs, max_readers=2, max_bytes=1)  # every tile rendered: every request reads
    with cache.reading("s0", "s0", None) as held:
        for i in (1, 2, 3):  # s0 is evicted meanwhile
            with cache.reading(f"s{i}", f"s{i}", None):
                pass
        assert held.evicted and held.reader.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    with pytest.raises(ctypes.ArgumentError, match="closed slide"):  # closed once its last user left
        held.reader.read_region((0, 0), 0, (64, 64))

    errors: list[BaseException] = []
    info = cache.info("s0", "s0", None)
    level = info.max_level

    def view(worker: int) -> None:
        try:
            for n in range(24):
                i = (worker + n) % 4
                cache.tile(f"s{i}", f"s{i}", None, level, n % 4, worker % 4)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=view, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache.close()


def test_coarse_tiles_of_a_slide_without_a_pyramid_come_from_its_overview(tmp_path, cmu_svs: Path, monkeypatch) -> None:
    """A single-level slide (a flat TIFF export) had no level coarse enough for zoomed-out tiles: each read the
    whole level, past the reader's limit a 413 `slide_too_large`, so the navigator and every zoomed-out view stayed
    empty. Those tiles are now cut from the slide's overview, made once. Here the sample (one level, 2220 x 2967)
    stands for a large flat slide: the reader's limit is lowered below its size."""
    import service.api.tiles as tiles
    import service.slides.readers._common as common
    import service.slides.thumbnail as thumbnail
    from service.api.tiles import TileCache, render_tile
    from service.store.blobs import FileBlobStore

    blobs = FileBlobStore(tmp_path / "blobs")
    blobs.put_file("s", cmu_svs)
    cache = TileCache(blobs, max_bytes=1)
    with cache.reading("s", "s", None) as entry:
        assert len(entry.reader.level_downsamples) == 1
        info = entry.info
        coarse = info.max_level - 4  # 16 level-0 px a tile pixel: the whole slide in one tile
        direct = render_tile(entry.reader, info, coarse, 0, 0)
        monkeypatch.setattr(common, "MAX_REGION_PIXELS", 1_000_000)
        monkeypatch.setattr(tiles, "DIRECT_READ_PIXELS", 500_000)
        monkeypatch.setattr(thumbnail, "CHUNK", 512)  # the overview reads in chunks under the (lowered) limit
        with pytest.raises(Exception, match="pixels per read"):  # what a coarse tile of a large flat slide met
            render_tile(entry.reader, info, coarse, 0, 0)
        cut = render_tile(entry.reader, info, coarse, 0, 0, entry.overview)
        assert cut.shape == direct.shape and np.abs(cut.astype(int) - direct).mean() < 3
        overview = entry._overview
        assert overview is not None and max(overview.shape[:2]) == min(
            tiles.OVERVIEW_SIDE, max(info.width, info.height)
        )
        for level in range(coarse - 3, info.max_level - 1):  # every zoomed-out level renders, from one overview
            w, h = info.level_size(level)
            render_tile(entry.reader, info, level, (w - 1) // info.tile_size, (h - 1) // info.tile_size, entry.overview)
        assert entry._overview is overview
        fine = render_tile(entry.reader, info, info.max_level, 1, 1, entry.overview)  # fine tiles read the slide
        assert np.array_equal(fine, render_tile(entry.reader, info, info.max_level, 1, 1))
    cache.close()


def test_the_default_heatmap_of_a_slide_without_a_small_level_is_an_overview(served, monkeypatch) -> None:
    """The default heatmap is the finest level under the overlay limit; a slide without a pyramid has none, so the
    default fell back to its only level, past the image limit: a 422, and the viewer said the job had no
    per-patch scores. It is now an overview-sized canvas (the viewer stretches the overlay over the slide)."""
    import service.results.heatmap_levels as hl

    c, job = served
    jid = job["id"]
    dims = c.get(f"/jobs/{jid}/result", headers=A).json()["slide"]["level_dimensions"]
    assert len(dims) == 1  # the sample has one level, as a flat slide does
    monkeypatch.setattr(hl, "OVERLAY_PIXELS", 1_000_000)  # the sample then stands for a large flat slide
    r = c.get(f"/jobs/{jid}/heatmap", params={"alpha": 0.9}, headers=A)
    assert r.status_code == 200 and r.headers["x-pyramid-level"] == "overview", r.text
    w, h = Image.open(io.BytesIO(r.content)).size
    assert w * h <= 1_000_000 and abs(w / h - dims[0][0] / dims[0][1]) < 0.01


def test_downloads_answer_head_and_revalidate_with_their_checksum(served) -> None:
    """HEAD answered 405 on every GET route (what `curl -I`, load balancers and download managers send), and the
    stored downloads sent an ETag but ignored If-None-Match: every revalidation sent the whole file again."""
    c, job = served
    jid = job["id"]
    for path in ("features", "heatmap.png", "result"):
        full = c.get(f"/jobs/{jid}/{path}", headers=A)
        assert full.status_code == 200 and full.headers["etag"] == f'"{full.headers["x-content-sha256"]}"', path
        head = c.head(f"/jobs/{jid}/{path}", headers=A)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["etag"] == full.headers["etag"] and head.headers["content-length"] == str(len(full.content))
        again = c.get(f"/jobs/{jid}/{path}", headers={**A, "If-None-Match": full.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", path
        assert c.head(f"/jobs/{jid}/{path}", headers=B).status_code == 404  # the GET's checks, tenant included
    assert c.head("/slides", headers=A).status_code == 200 and c.head("/slides").status_code == 401
