"""The same real pixels (CMU-1-Small-Region) in four containers must read alike: Aperio SVS, a generic tiled
TIFF pyramid and a SubIFD OME-TIFF (both written here by tifffile), and the DICOM WSI series."""

from __future__ import annotations

import threading

import numpy as np
import openslide
import pytest
from slide_fixtures import write_both

from service.slides.open import open_slide
from service.slides.readers.openslide_reader import OpenSlideReader
from service.slides.readers.tiff_reader import TiffReader
from service.slides.sniff import sniff_format

REGIONS = [(0, 0), (700, 900), (1500, 2000), (200, 1200), (1200, 300), (1900, 2700)]
# Mean |Δ| on 0-255 per 400x400 level-0 region against the SVS. Every container re-encodes the SVS's JPEG Q30
# tiles (ours at Q90, wsi2dcm's at its own quality), so dense tissue differs by up to ~7.5; a colour or
# geometry error (pink DICOM decode, 1-px shift) gives 20-80.
MAX_REGION_DIFF = 9.0
MAX_MEAN_DIFF = 6.0


@pytest.fixture(scope="module")
def containers(tmp_path_factory, cmu_svs, dicom_dir):
    generic, ome = write_both(cmu_svs, tmp_path_factory.mktemp("containers"))
    return {"svs": cmu_svs, "generic": generic, "ome": ome, "dicom": dicom_dir}


def test_formats_and_readers(containers):
    assert sniff_format(containers["generic"]) == "tiff"
    assert sniff_format(containers["ome"]) == "ome-tiff"
    with open_slide(containers["generic"]) as g, open_slide(containers["ome"]) as o:
        assert isinstance(g, OpenSlideReader) and g.level_count == 4
        assert isinstance(o, TiffReader) and o.level_count == 4
        assert g.mpp.source == "tiff-resolution" and o.mpp.source == "ome"
    # Why the OME-TIFF goes to tifffile: OpenSlide ignores SubIFDs and sees one level.
    with openslide.OpenSlide(str(containers["ome"])) as s:
        assert s.level_count == 1


@pytest.mark.parametrize("name", ["generic", "ome", "dicom"])
def test_same_geometry_and_mpp(containers, name):
    with open_slide(containers["svs"]) as ref, open_slide(containers[name]) as r:
        assert r.dimensions == ref.dimensions == (2220, 2967)
        assert r.mpp.x == pytest.approx(ref.mpp.x, rel=0.01) and r.mpp.y == pytest.approx(ref.mpp.y, rel=0.01)
        assert r.level_downsamples[1] == pytest.approx(2.0, rel=0.01)


@pytest.mark.parametrize("name", ["generic", "ome", "dicom"])
def test_same_pixels(containers, name):
    with open_slide(containers["svs"]) as ref, open_slide(containers[name]) as r:
        diffs = [
            np.abs(
                r.read_region(loc, 0, (400, 400)).astype(int) - ref.read_region(loc, 0, (400, 400)).astype(int)
            ).mean()
            for loc in REGIONS
        ]
        assert max(diffs) < MAX_REGION_DIFF and np.mean(diffs) < MAX_MEAN_DIFF, diffs
        # thumbnails come from the coarser levels; DICOM's were downsampled by wsi2dcm with its own filter
        t_ref, t = ref.thumbnail(256).astype(int), r.thumbnail(256).astype(int)
        assert t.shape == t_ref.shape and np.abs(t - t_ref).mean() < 10


def test_tifffile_and_openslide_agree_level_by_level(containers):
    """Same bytes written twice, read by two libraries: whole levels must be identical."""
    with open_slide(containers["generic"]) as g, open_slide(containers["ome"]) as o:
        for level in range(4):
            dims = g.level_dimensions[level]
            assert o.level_dimensions[level] == dims
            a, b = g.read_region((0, 0), level, dims), o.read_region((0, 0), level, dims)
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.5


def test_tiff_reader_concurrent_reads_match_serial(containers):
    with open_slide(containers["ome"]) as r:
        jobs = [((x, y), lvl) for x in range(0, 2200, 500) for y in range(0, 2900, 600) for lvl in (0, 1)]
        serial = [r.read_region(loc, lvl, (256, 256)) for loc, lvl in jobs]
        out: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            out[i] = r.read_region(jobs[i][0], jobs[i][1], (256, 256))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(serial[i], out[i]) for i in range(len(jobs)))


def test_opening_a_dicom_series_logs_no_paths_or_uids(dicom_dir, caplog) -> None:
    """wsidicom warned, nine lines a slide, with the file path and the Study, Series and Frame-of-Reference UIDs
    of each instance whose frame of reference differs from its series' (the sample's do), into the gateway log;
    the service logs ids only."""
    import logging

    from service.slides.open import open_slide

    with caplog.at_level(logging.WARNING), open_slide(dicom_dir) as reader:
        assert reader.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)
    leaked = [r.getMessage() for r in caplog.records if "1.2.276" in r.getMessage() or str(dicom_dir) in r.getMessage()]
    assert not leaked, leaked[:1]
