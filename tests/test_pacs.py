"""Hospital PACS round trip against a real Orthanc with its DICOMweb plugin (started here on loopback):
the real CMU slide converted to DICOM WSI by OrthancWSIDicomizer and stored in Orthanc, analysed by its UIDs
through the API (embedded runner, tiny exported bundle), the results found back in the same study by QIDO-RS
and read with highdicom; a second trigger stores nothing twice; every PACS fault is a failed job with its
reason. Faults Orthanc cannot produce (403, 500, malformed JSON, a hang) come from a small real HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pydicom
import pytest
from services import (  # noqa: F401
    PHI,
    dicomize,
    free_port,
    fresh_database,
    live_server,
    postgres_url,
    redis_server,
    run_orthanc,
    wait_job,
    webhook_receiver,
)
from slide_fixtures import (
    concatenation,
    focal_planes,
    write_dicom_variant,
    write_sparse_dicom,
    write_transcoded_dicom,
)

from service.api import create_app
from service.api.schemas import DEFAULT_TASKS
from service.config import Settings

pytestmark = pytest.mark.services
KEY = "pacs-tenant-key-0123456789abcdef"
CLINIC_KEY = "pacs-clinic-key-0123456789abcdef"
ADMIN_KEY = "pacs-admin-key-0123456789abcdef"
USERS = {"pacs": "s3cret-pw"}


class _Faults(http.server.BaseHTTPRequestHandler):
    """`/<mode>/...`: s403, s404, s500 answer that status; badjson answers 200 with broken JSON; hang sleeps."""

    hits: ClassVar[dict[str, int]] = {}

    def _answer(self) -> None:
        mode = self.path.strip("/").split("/")[0]
        type(self).hits[mode] = type(self).hits.get(mode, 0) + 1
        if mode == "hang":
            time.sleep(4)
        if mode.startswith("s") and mode[1:].isdigit():
            self.send_response(int(mode[1:]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'[{"0020000E": {"vr": "UI", "Value": ["1.2'  # cut short: not JSON
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _serve(handler: type[http.server.BaseHTTPRequestHandler]):
    """`handler` on a loopback port in a thread, for the module's fault-injecting servers."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def faults():
    with _serve(_Faults) as url:
        yield url


class _FrameFaults(http.server.BaseHTTPRequestHandler):
    """`/<mode>/...` forwards to the real Orthanc (`upstream`), except WADO-RS frame requests after the first
    few: `frames500` answers them 500, `frameshang` does not answer within the read timeout. A PACS whose
    search, metadata and first frames work, and whose frame store then breaks or stalls mid-analysis."""

    upstream: ClassVar[str] = ""
    frames: ClassVar[dict[str, int]] = {}
    healthy_frames = 10  # opening the slide works (one frame per level and a few more); later reads fail

    def do_GET(self) -> None:
        import requests

        mode, _, rest = self.path.lstrip("/").partition("/")
        if "/frames/" in rest:
            type(self).frames[mode] = type(self).frames.get(mode, 0) + 1
            if type(self).frames[mode] <= self.healthy_frames:
                mode = "pass"
        if "/frames/" in rest and mode == "frames500":
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "/frames/" in rest and mode == "frameshang":
            time.sleep(4)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")}
        r = requests.get(f"{self.upstream}/{rest}", headers=headers, timeout=30)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() in ("content-type",):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def frame_faults(orthanc):
    _FrameFaults.upstream = orthanc.url
    with _serve(_FrameFaults) as url:
        yield url


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from inference_fixtures import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def orthanc():
    with run_orthanc(users=USERS) as server:
        yield server


def _uids(files: list[Path]) -> tuple[str, str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def slide(orthanc, cmu_svs, tmp_path_factory) -> tuple[str, str, list[Path]]:
    files = dicomize(cmu_svs, tmp_path_factory.mktemp("dicomized"))
    orthanc.upload(files)
    return (*_uids(files), files)


def test_pacs_series_streams_frames_through_the_tile_path_with_the_files_pixels(orthanc, slide) -> None:
    """A series read over DICOMweb takes the frame path (each frame fetched and decoded once, read ahead by
    both reader threads) and streams the patches its own `read_region` gives, and those of the same series
    read from its files."""
    from service.pacs.config import PacsServer
    from service.pacs.source import PacsSlideSource
    from service.slides.grid import build_grid
    from service.slides.open import open_slide
    from service.slides.stream import PatchReader, iter_batches

    study, series, files = slide
    ((user, pw),) = USERS.items()
    server = PacsServer(**_server("main", orthanc.url, auth="basic", username=user, password=pw))

    def patches(reader, grid, **kw) -> np.ndarray:
        return np.concatenate([b for b, _ in iter_batches(reader, grid, batch_size=16, **kw)])

    with open_slide(files[0]) as local:
        grid = build_grid(local)
        ref = patches(local, grid, fast=False)
    with PacsSlideSource(server, study, series).open_reader() as remote:
        assert PatchReader(remote, grid).mode == "fast-dicom"
        fetched = patches(remote, grid)
    assert len(grid) > 10 and np.array_equal(fetched, ref)


def test_sparse_pacs_series_reads_as_its_files(orthanc, dicom_dir, tmp_path) -> None:
    """A TILED_SPARSE series over DICOMweb (frames placed by their plane positions, two left out): the frame path
    reads what the same files read locally, white where no frame is stored."""
    from service.pacs.config import PacsServer
    from service.pacs.source import PacsSlideSource
    from service.slides.grid import build_grid
    from service.slides.open import open_slide
    from service.slides.stream import PatchReader, iter_batches

    sparse = write_sparse_dicom(dicom_dir, tmp_path / "sparse", drop={7, 12})
    files = sorted(sparse.glob("*.dcm"))
    orthanc.upload(files)
    ((user, pw),) = USERS.items()
    server = PacsServer(**_server("main", orthanc.url, auth="basic", username=user, password=pw))
    with open_slide(sparse) as local:
        grid = build_grid(local, target_mpp=0.5)
        ref = np.concatenate([b for b, _ in iter_batches(local, grid, fast=False)])
        hole = local.read_region((1000, 500), 0, (500, 1000))
    with PacsSlideSource(server, *_uids(files)).open_reader() as remote:
        assert PatchReader(remote, grid).mode == "fast-dicom"
        fetched = np.concatenate([b for b, _ in iter_batches(remote, grid)])
        assert np.array_equal(remote.read_region((1000, 500), 0, (500, 1000)), hole)
    assert (hole == 255).all() and np.array_equal(fetched, ref)


def _relabel_level0(ds, level, frames) -> None:
    if level == 0:
        ds.PhotometricInterpretation = "YBR_FULL_422"


@pytest.mark.parametrize(
    "variant", ["concatenation", "three focal planes", "sparse, no frame at the corner", "levels labelled apart"]
)
def test_series_as_archives_hold_them_read_through_the_pacs_as_from_their_files(
    orthanc, dicom_dir, tmp_path, variant
) -> None:
    """Series written the ways archives hold them, each read over DICOMweb: every level and the streamed grid
    equal the files' pixels, and the files' equal the sample's (white where a sparse level stores nothing).
    - Level 0 as a concatenation of three instances: wsidicom's web source took each part for the whole level
      and numbered every part's frames from the level's first (tile (0, 0) came from another part's frame,
      later frames were HTTP 400).
    - Three focal planes in level 0's one instance: refused as "90 frames, at most 30", as the instance search
      did not ask for the focal plane and optical path counts.
    - A sparse level 0 with no frame at (0, 0), and a level 0 labelled right while the coarser levels keep the
      sample's colour mislabel: the mislabel check read tile (0, 0) and applied level 0's label to every level."""
    from service.pacs.config import PacsServer
    from service.pacs.source import PacsSlideSource
    from service.slides.grid import build_grid
    from service.slides.open import open_slide
    from service.slides.stream import iter_batches

    folder = tmp_path / "series"
    if variant == "sparse, no frame at the corner":
        write_sparse_dicom(dicom_dir, folder, drop={0})
    else:
        edit = {
            "concatenation": concatenation([10, 25]),
            "three focal planes": focal_planes(3),
            "levels labelled apart": _relabel_level0,
        }[variant]
        write_dicom_variant(dicom_dir, folder, edit)
    files = sorted(folder.glob("*.dcm"))
    orthanc.upload(files)

    def levels(reader) -> list[np.ndarray]:
        return [reader.read_region((0, 0), lv, reader.level_dimensions[lv]) for lv in range(reader.level_count)]

    def patches(reader, grid) -> np.ndarray:
        return np.concatenate([b for b, _ in iter_batches(reader, grid)])

    with open_slide(dicom_dir) as sample:
        expected = levels(sample)
    if variant.startswith("sparse"):
        expected[0][:500, :500] = 255
    ((user, pw),) = USERS.items()
    server = PacsServer(**_server("main", orthanc.url, auth="basic", username=user, password=pw))
    with open_slide(folder) as local:
        grid = build_grid(local, target_mpp=0.5)
        ref = patches(local, grid)
        assert all(np.array_equal(a, b) for a, b in zip(levels(local), expected, strict=True))
    with PacsSlideSource(server, *_uids(files)).open_reader() as remote:
        assert all(np.array_equal(a, b) for a, b in zip(levels(remote), expected, strict=True))
        assert np.array_equal(patches(remote, grid), ref)


def test_concatenation_missing_a_part_in_the_pacs_is_refused(orthanc, dicom_dir, tmp_path) -> None:
    """A concatenation one of whose parts the PACS does not hold is refused when the series is opened, naming
    it, rather than failing (or reading white) only where a patch needs a missing frame."""
    from service.errors import CorruptSlideError
    from service.pacs.config import PacsServer
    from service.pacs.source import PacsSlideSource

    folder = write_dicom_variant(dicom_dir, tmp_path / "series", concatenation([15]))
    files = [f for f in sorted(folder.glob("*.dcm")) if f.name != "level-0-part-1.dcm"]
    orthanc.upload(files)
    ((user, pw),) = USERS.items()
    server = PacsServer(**_server("main", orthanc.url, auth="basic", username=user, password=pw))
    source = PacsSlideSource(server, *_uids(files))
    with (
        pytest.raises(CorruptSlideError, match=r"concatenation .* is incomplete: 1 of its 2 parts"),
        source.open_reader(),
    ):
        pass


@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"]
)  # JPEG 2000, uncompressed, JPEG-LS
def test_lossless_pacs_series_is_fetched_as_stored_and_its_label_never(
    orthanc, dicom_dir, tmp_path, monkeypatch, syntax
) -> None:
    """A series whose frames are JPEG 2000 or uncompressed, fetched over DICOMweb, streams exactly what its files
    stream. wsidicom on its own asks for JPEG baseline first: this Orthanc cannot transcode JPEG 2000 into it
    (HTTP 500, the series unreadable) and re-compressed uncompressed frames into lossy JPEG (up to 22 levels
    off). The reader asks for the stored syntax (`transfer-syntax=*`). The series' LABEL instance (patient data)
    is never requested, not even its metadata. (HTJ2K is not tried here: this Orthanc does not know it at all.)"""
    from pydicom.uid import generate_uid

    from service.pacs.client import PacsSession
    from service.pacs.config import PacsServer
    from service.pacs.source import PacsSlideSource
    from service.slides.grid import build_grid
    from service.slides.open import open_slide
    from service.slides.stream import iter_batches

    j2k = write_transcoded_dicom(dicom_dir, tmp_path / "j2k", syntax)
    files = sorted(j2k.glob("*.dcm"))
    label = pydicom.dcmread(j2k / "level-11-frames-0-1.dcm")
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    label.SOPInstanceUID = label.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    label.save_as(tmp_path / "label.dcm")
    orthanc.upload([*files, tmp_path / "label.dcm"])
    urls: list[str] = []
    real = PacsSession.request

    def logged(self, method, url, *args, **kwargs):
        urls.append(str(url))
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(PacsSession, "request", logged)
    ((user, pw),) = USERS.items()
    server = PacsServer(**_server("main", orthanc.url, auth="basic", username=user, password=pw))
    with open_slide(j2k) as local:
        grid = build_grid(local, target_mpp=0.5)
        ref = np.concatenate([b for b, _ in iter_batches(local, grid)])
    with PacsSlideSource(server, *_uids(files)).open_reader() as remote:
        fetched = np.concatenate([b for b, _ in iter_batches(remote, grid)])
    assert np.array_equal(fetched, ref)
    assert any("/frames/" in u for u in urls) and not any(str(label.SOPInstanceUID) in u for u in urls)


def _server(name: str, url: str, **kw) -> dict:
    return {"name": name, "tenant": "hospital", "url": url, "read_timeout_s": 1.5, "stow_backoff_s": 0.05, **kw}


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    """Ports of the Orthancs that tests start later (the watched one, the one with the Lua trigger): the
    gateway's configuration names them before they run."""
    return {"watched": free_port(), "trigger": free_port(), "picky": free_port()}


@pytest.fixture(scope="module")
def fhir_sink():
    """A real HTTP endpoint standing in for the LIS's FHIR server: records every POST."""
    with webhook_receiver() as (url, got):
        yield url, got


@pytest.fixture(scope="module")
def gateway(orthanc, faults, frame_faults, bundle_dir, ports, fhir_sink, tmp_path_factory):
    user, pw = next(iter(USERS.items()))
    servers = [
        _server("main", orthanc.url, auth="basic", username=user, password=pw, heatmap="both"),
        _server("wrong-password", orthanc.url, auth="basic", username=user, password="nope"),
        _server("no-stow", orthanc.url, auth="basic", username=user, password=pw, stow_prefix="no-such-stow"),
        _server("forbidden", f"{faults}/s403"),
        _server("missing", f"{faults}/s404"),
        _server("broken", f"{faults}/s500"),
        _server("garbled", f"{faults}/badjson"),
        _server("hangs", f"{faults}/hang"),
        _server("frames-fail", f"{frame_faults}/frames500", auth="basic", username=user, password=pw),
        _server("frames-hang", f"{frame_faults}/frameshang", auth="basic", username=user, password=pw),
        {**_server("other-tenant", orthanc.url), "tenant": "someone-else"},
        _server("watched", f"http://127.0.0.1:{ports['watched']}", read_timeout_s=10),
        _server("trigger", f"http://127.0.0.1:{ports['trigger']}", read_timeout_s=10),
        _server("picky", f"http://127.0.0.1:{ports['picky']}", read_timeout_s=10, stow_attempts=2),
        {**_server("clinic-pacs", orthanc.url, auth="basic", username=user, password=pw), "tenant": "clinic"},
    ]
    root = tmp_path_factory.mktemp("gateway")
    settings = Settings(
        data_dir=root,
        bundle_dir=bundle_dir,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[
            {"tenant": "hospital", "key": KEY},
            {"tenant": "hospital", "key": ADMIN_KEY, "admin": True},
            {"tenant": "clinic", "key": CLINIC_KEY},
        ],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSTAR_PACS_SERVERS", json.dumps(servers))  # the spawned workers read it too
        fhir = [
            {"tenant": "hospital", "url": fhir_sink[0]},
            {"tenant": "clinic", "url": f"{faults}/s502", "attempts": 2, "backoff_s": 0.05},  # an LIS that is down
        ]
        mp.setenv("MSTAR_PACS_FHIR_ENDPOINTS", json.dumps(fhir))
        with live_server(create_app(settings)) as url:
            yield url, root


def _client(url: str, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


_wait = functools.partial(wait_job, timeout=240)  # a job through the whole stack


def _analyse(c: httpx.Client, **body) -> dict:
    r = c.post("/pacs/analyses", json=body)
    assert r.status_code == 202, r.text
    return _wait(c, r.json()["id"])


def _dicomweb(orthanc):
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(f"{orthanc.url}/dicom-web", session=session)


def _no_phi(text: str) -> None:
    for value in PHI.values():
        assert value not in text, f"patient data {value!r} leaked"


def test_round_trip_results_back_in_the_study(gateway, orthanc, slide, fhir_sink) -> None:
    import highdicom as hd

    url, root = gateway
    study, series, files = slide
    before = orthanc.count()
    with _client(url) as c:
        job = _analyse(c, pacs="main", study_uid=study)  # series found by QIDO (the study's one SM series)
        assert job["state"] == "succeeded", job
        result = c.get(f"/jobs/{job['id']}/result").json()
    assert result["slide"]["mpp"]["x"] == pytest.approx(0.499) == result["slide"]["mpp"]["y"]
    src = result["source"]
    assert src["series_uid"] == series and src["frames_in_series"] > 0
    series_bytes = sum(f.stat().st_size for f in files)
    assert 0 < src["bytes_fetched"] < series_bytes  # tissue frames only, never the whole series
    assert 0 < src["frames_fetched"] < src["frames_in_series"]
    dicom = result["dicom"]
    assert dicom["stored"] is True and dicom["study_instance_uid"] == study
    written = {"mstar-sr.dcm", "mstar-seg.dcm", "mstar-pmap.dcm", "mstar-ann.dcm", "mstar-report-sr.dcm"}
    assert set(dicom["objects"]) == written  # heatmap: both
    assert orthanc.count() == before + 5

    # QIDO-RS finds the new series in the same study; highdicom reads each back with result.json's values
    dw = _dicomweb(orthanc)
    found = {s["00080060"]["Value"][0] for s in dw.search_for_series(study)}
    assert {"SM", "SR", "SEG", "ANN", "OT"} <= found  # a Parametric Map's modality is OT

    def fetch(name: str):
        o = dicom["objects"][name]
        return dw.retrieve_instance(study, o["series_instance_uid"], o["sop_instance_uid"])

    sr = hd.sr.srread(io.BytesIO(_bytes(fetch("mstar-sr.dcm"))))
    assert sr.CompletionFlag == "PARTIAL" or sr.VerificationFlag == "UNVERIFIED"
    values = _sr_numbers(sr)
    for head, out in result["classification"].items():
        for label, p in out["probabilities"].items():
            assert values[f"Probability of {label} ({head})"] == pytest.approx(p, abs=1e-6)
    for head, out in result["survival"].items():
        risk = out["risk"][0] if isinstance(out["risk"], list) else out["risk"]
        assert values[f"Survival risk score ({head})"] == pytest.approx(risk, abs=1e-6)
    algo = _sr_text(sr)
    assert result["bundle"]["name"] in algo

    ann = hd.ann.annread(io.BytesIO(_bytes(fetch("mstar-ann.dcm"))))
    group = ann.get_annotation_groups()[0]
    names, values, _units = group.get_measurements()
    meanings = [n.meaning for n in names]
    att = values[:, meanings.index("Aggregator attention")]
    polys = group.get_graphic_data(coordinate_type="2D")
    assert len(polys) == result["tiling"]["patches"] == att.shape[0]
    corner = {(int(p[0][0]), int(p[0][1])): float(a) for p, a in zip(polys, att, strict=True)}
    for top in result["attention"]["top_patches"]:
        assert corner[(top["x"], top["y"])] == pytest.approx(top["score"], abs=1e-5)
    # per-class patch scores: one measurement per class of each classifier head, as in patch_scores.h5
    from service.results import patch_scores

    scores = patch_scores.read(next(p for p in root.rglob("patch_scores.h5") if job["id"] in str(p)))
    corners = np.array([[int(p[0][0]), int(p[0][1])] for p in polys])
    assert np.array_equal(corners, scores.coords)  # the same patches, in the same order
    per_class = [(h, label, c) for h in scores.heads if h.probabilities is not None for c, label in enumerate(h.labels)]
    assert per_class, "the test bundle has a classifier head scoring patches"
    for head, label, c in per_class:
        got = values[:, meanings.index(f"Patch probability of {label} ({head.name})")]
        np.testing.assert_allclose(got, head.probabilities[:, c], atol=1e-6)
    assert len(meanings) == 1 + len(per_class)

    seg = hd.seg.segread(io.BytesIO(_bytes(fetch("mstar-seg.dcm"))))
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID
    step = result["tiling"]["patch_size_level0"]
    fmap = seg.get_total_pixel_matrix()[:, :, 0]  # relative attention, 0..1, one pixel per patch step
    assert fmap.shape == (-(-2967 // step), -(-2220 // step))
    best = result["attention"]["top_patches"][0]
    assert fmap[best["y"] // step, best["x"] // step] == pytest.approx(1.0) == fmap.max()
    last = result["attention"]["top_patches"][-1]
    assert fmap[last["y"] // step, last["x"] // step] == pytest.approx(last["score"] / best["score"], abs=0.01)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert float(spacing[0]) == pytest.approx(0.000499 * step, rel=1e-3)
    _assert_on_the_slide(seg, files, step)

    # the float Parametric Map: the attention values themselves, on the same grid and frame of reference
    pmap = hd.pm.ParametricMap.from_dataset(fetch("mstar-pmap.dcm"))
    assert pmap.FrameOfReferenceUID == seg.FrameOfReferenceUID and pmap.Modality == "OT"
    pm_spacing = pmap.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in pm_spacing] == [float(v) for v in spacing]
    pixels = pmap.get_total_pixel_matrix()
    pixels = pixels[..., 0] if pixels.ndim == 3 else pixels
    assert pixels.dtype.kind == "f" and pixels.shape == fmap.shape
    _assert_on_the_slide(pmap, files, step)
    for top in result["attention"]["top_patches"]:
        assert pixels[top["y"] // step, top["x"] // step] == pytest.approx(top["score"], abs=1e-6)  # 6 decimals

    text = hd.sr.srread(io.BytesIO(_bytes(fetch("mstar-report-sr.dcm"))))
    assert text.VerificationFlag == "UNVERIFIED" and text.CompletionFlag == "PARTIAL"
    assert result["report"]["text"] in _sr_text(text) and "AI-generated draft" in _sr_text(text)

    # the same objects as a download, and the FHIR report
    with _client(url) as c:
        z = c.get(f"/jobs/{job['id']}/dicom")
        assert z.status_code == 200
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert sorted(zf.namelist()) == sorted(dicom["objects"])
            sops = {str(pydicom.dcmread(io.BytesIO(zf.read(n))).SOPInstanceUID) for n in zf.namelist()}
        assert sops == {o["sop_instance_uid"] for o in dicom["objects"].values()}
        fhir = c.get(f"/jobs/{job['id']}/fhir")
        assert fhir.status_code == 200 and fhir.headers["content-type"].startswith("application/fhir+json")
        report = fhir.json()
        job_row = c.get(f"/jobs/{job['id']}").text
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    DiagnosticReport.model_validate(report)
    posted = [json.loads(body) for _headers, body in fhir_sink[1]]
    assert any(p["id"] == job["id"] and p["resourceType"] == "DiagnosticReport" for p in posted)  # to the LIS
    assert report["status"] == "preliminary" and "AI-generated draft" in report["conclusion"]
    obs = {o["id"]: o for o in report["contained"] if o["resourceType"] == "Observation"}
    head, out = next(iter(result["classification"].items()))
    assert obs[f"class-{head}"]["valueCodeableConcept"]["text"] == out["label"]
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    device = next(o for o in report["contained"] if o["resourceType"] == "Device")
    assert any("sha256" in json.dumps(v) for v in device["version"])

    # privacy: the study carries patient data; none of it reaches job rows, results or the FHIR report
    for text_out in (job_row, json.dumps(result), json.dumps(report)):
        _no_phi(text_out)
    assert any(p in pydicom.dcmread(files[0], stop_before_pixels=True).PatientName for p in ["SOME"])


def _assert_on_the_slide(obj, files: list[Path], step: int) -> None:
    """What a viewer needs to overlay a heatmap on the slide, checked against the source series itself: the
    level-0 VOLUME image it references, the same frame of reference, container (slide), orientation and
    origin as every pyramid level, a pixel spacing of the slide's x step, and a total pixel matrix that
    covers the slide's with less than one step to spare."""
    levels = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    levels = [d for d in levels if "VOLUME" in d.ImageType]
    src = max(levels, key=lambda d: int(d.TotalPixelMatrixColumns))
    refs = {str(r.ReferencedSOPInstanceUID) for r in obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(src.SOPInstanceUID)}
    assert obj.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert obj.ContainerIdentifier == src.ContainerIdentifier
    assert [float(v) for v in obj.ImageOrientationSlide] == [float(v) for v in src.ImageOrientationSlide]
    origin = obj.TotalPixelMatrixOriginSequence[0]
    for level in levels:  # the heatmap sits on the slide like one more (coarser) level of its pyramid
        o = level.TotalPixelMatrixOriginSequence[0]
        assert float(origin.XOffsetInSlideCoordinateSystem) == float(o.XOffsetInSlideCoordinateSystem)
        assert float(origin.YOffsetInSlideCoordinateSystem) == float(o.YOffsetInSlideCoordinateSystem)
    spacing = [float(v) for v in obj.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    src_spacing = [float(v) for v in src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([v * step for v in src_spacing], rel=1e-6)
    for ours, theirs in (
        (obj.TotalPixelMatrixRows, src.TotalPixelMatrixRows),
        (obj.TotalPixelMatrixColumns, src.TotalPixelMatrixColumns),
    ):
        assert 0 <= int(ours) * step - int(theirs) < step


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def _sr_numbers(sr) -> dict[str, float]:
    out = {}
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "NUM":
            out[item.ConceptNameCodeSequence[0].CodeMeaning] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def _sr_text(sr) -> str:
    parts = []
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "TEXT":
            parts.append(str(item.TextValue))
        if item.ValueType == "CODE":
            parts.append(str(item.ConceptCodeSequence[0].CodeMeaning))
    return "\n".join(parts)


class _ViewerSite(http.server.BaseHTTPRequestHandler):
    """One origin for the viewer test: the page, the viewer's prebuilt bundle (npm, ui/package.json) and a
    DICOMweb proxy to Orthanc (which sends no CORS headers). The browser's Host header goes through, so the
    bulk data URIs Orthanc writes into its metadata point back at this origin."""

    upstream: ClassVar[str] = ""
    auth: ClassVar[tuple[str, str] | None] = None
    ROOT = Path(__file__).resolve().parents[1]
    FILES: ClassVar[dict[str, Path]] = {
        "/": ROOT / "tests" / "ui" / "dmv_page.html",
        "/dicomweb-client.js": ROOT / "ui" / "node_modules" / "dicomweb-client" / "build" / "dicomweb-client.js",
    }
    DIST = ROOT / "ui" / "node_modules" / "dicom-microscopy-viewer" / "dist"

    def do_GET(self) -> None:
        import requests

        if self.path.startswith("/dicom-web/"):
            keep = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
            r = requests.get(self.upstream + self.path, headers=keep, auth=self.auth, timeout=30)
            body, ctype, status = r.content, r.headers.get("Content-Type", ""), r.status_code
        else:
            path = self.FILES.get(self.path)
            if path is None and self.path.startswith("/dmv/") and ".." not in self.path:
                path = self.DIST / self.path[len("/dmv/") :]
            if path is None or not path.is_file():
                self.send_error(404)
                return
            body, status = path.read_bytes(), 200
            ctype = {".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm"}.get(
                path.suffix, "application/octet-stream"
            )
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_dicom_microscopy_viewer_opens_the_slide_with_our_segmentation_and_annotations(gateway, orthanc, slide) -> None:
    """A real DICOM viewer (dicom-microscopy-viewer, in Debian's headless Chromium) opens the slide from Orthanc
    over DICOMweb and takes our SEG and bulk annotations from the same study: it fetches the slide's and the
    SEG's frames (all answered 200), lists our segment and annotation group by UID, shows both, and raises no
    page error."""
    import shutil
    import subprocess

    root = _ViewerSite.ROOT
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        pytest.fail("node and Debian chromium are needed: run `bash tests/sysdeps.sh`")
    if not _ViewerSite.DIST.is_dir():  # the pinned versions of ui/package-lock.json, as the `ui` step installs
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=root / "ui", check=True, timeout=300)
    url, _ = gateway
    study, series, _files = slide
    with _client(url) as c:  # the round trip's analysis (the same options give the same job back)
        job = _analyse(c, pacs="main", study_uid=study)
        assert job["state"] == "succeeded", job
        objects = c.get(f"/jobs/{job['id']}/result").json()["dicom"]["objects"]
    seg, ann = objects["mstar-seg.dcm"], objects["mstar-ann.dcm"]
    _ViewerSite.upstream, _ViewerSite.auth = orthanc.url, orthanc.auth
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ViewerSite)
    site.daemon_threads = True
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        args = json.dumps([study, series, seg["series_instance_uid"], ann["series_instance_uid"]])
        proc = subprocess.run(
            ["node", str(root / "tests" / "ui" / "dmv_flow.mjs"), f"http://127.0.0.1:{site.server_port}/", args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        site.shutdown()
        site.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["errors"] == [], seen["errors"]
    loaded = seen["loaded"]
    assert loaded["levels"] >= 2
    assert [s["visible"] for s in loaded["segments"]] == [True] and loaded["segments"][0]["label"] == "mSTAR attention"
    assert [(g["uid"], g["visible"]) for g in loaded["groups"]] == [(_ann_group_uid(orthanc, study, ann), True)]
    frames = seen["frames"]
    assert frames and all(f["status"] == 200 for f in frames), frames
    assert any(f"/series/{series}/" in f["url"] for f in frames)  # the slide's tiles
    assert any(f"/series/{seg['series_instance_uid']}/" in f["url"] for f in frames)  # our heatmap's


def _ann_group_uid(orthanc, study: str, ann: dict) -> str:
    ds = _dicomweb(orthanc).retrieve_instance(study, ann["series_instance_uid"], ann["sop_instance_uid"])
    return str(ds.AnnotationGroupSequence[0].AnnotationGroupUID)


def test_slide_without_frame_of_reference_gets_no_heatmap_but_a_note(slide, tmp_path) -> None:
    """OrthancWSIDicomizer 1.1 writes no FrameOfReferenceUID: such a slide gets its SR, no SEG, Parametric
    Map or annotations (nothing to place them on), and result.json's notes say why."""
    import h5py

    from service.pacs.writers import Identity, build_objects

    src = pydicom.dcmread(max(slide[2], key=lambda f: f.stat().st_size), stop_before_pixels=True)
    assert "FrameOfReferenceUID" in src
    del src.FrameOfReferenceUID
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f["coords"] = np.array([[0, 0], [224, 0], [0, 224]])
        f["attention"] = np.array([0.5, 0.3, 0.2])
        f.attrs["patch_size_level0"] = f.attrs["step_level0"] = 224
    bundle = {"name": "tiny", "version": "v1", "models": {}}
    result = {"classification": {"subtype": {"label": "A", "probabilities": {"A": 0.6, "B": 0.4}}}}
    ident = Identity("1.2.3", "1.2.3.4", "tiny", "v1", {})
    objects, notes = build_objects(src, result, tmp_path / "features.h5", bundle, ident, heatmap="both")
    assert set(objects) == {"mstar-sr.dcm"}
    assert len(notes) == 1 and "no FrameOfReferenceUID" in notes[0] and "patch annotations" in notes[0]


def test_pacs_job_on_a_series_without_frame_of_reference_succeeds_with_a_note(gateway, orthanc, cmu_svs, tmp_path):
    """The same through the API on a real dicomized series without FrameOfReferenceUID: the job succeeds, the
    SR is in the study, and the notes name what was left out."""
    files = dicomize(cmu_svs, tmp_path / "no-for", levels=2, frame_of_reference=False)
    orthanc.upload(files)
    study, series = _uids(files)
    url, _ = gateway
    with _client(url) as c:
        job = _analyse(c, pacs="main", study_uid=study, series_uid=series, tasks=["classification"])
        assert job["state"] == "succeeded", job
        dicom = c.get(f"/jobs/{job['id']}/result").json()["dicom"]
    assert set(dicom["objects"]) == {"mstar-sr.dcm"} and dicom["stored"] is True
    assert any("no FrameOfReferenceUID" in n for n in dicom["notes"])


def test_second_trigger_stores_nothing_twice(gateway, orthanc, slide) -> None:
    url, _ = gateway
    study, series, _files = slide
    with _client(url) as c:
        first = _analyse(c, pacs="main", study_uid=study, series_uid=series)
        count = orthanc.count()
        again = c.post("/pacs/analyses", json={"pacs": "main", "study_uid": study, "series_uid": series})
        assert again.status_code == 202 and again.json()["id"] == first["id"]  # the same job
        # a forced re-run (another idempotency key) computes again and stores the same UIDs: no duplicates
        r = c.post(
            "/pacs/analyses",
            json={"pacs": "main", "study_uid": study, "series_uid": series},
            headers={"Idempotency-Key": "forced-rerun-1"},
        )
        rerun = _wait(c, r.json()["id"])
        assert rerun["state"] == "succeeded" and rerun["id"] != first["id"]
        a = c.get(f"/jobs/{first['id']}/result").json()["dicom"]["objects"]
        b = c.get(f"/jobs/{rerun['id']}/result").json()["dicom"]["objects"]
        # the same analysis asked for with the default tasks listed in another order: the same job, and forced
        # to run again, the same objects
        reordered = {"pacs": "main", "study_uid": study, "series_uid": series, "tasks": DEFAULT_TASKS[::-1]}
        assert c.post("/pacs/analyses", json=reordered).json()["id"] == first["id"]
        r = c.post("/pacs/analyses", json=reordered, headers={"Idempotency-Key": "forced-rerun-2"})
        third = _wait(c, r.json()["id"])
        assert third["state"] == "succeeded" and third["id"] not in (first["id"], rerun["id"])
        d = c.get(f"/jobs/{third['id']}/result").json()["dicom"]["objects"]
    assert a == b == d
    assert orthanc.count() == count


# An Orthanc that drops Microscopy Bulk Simple Annotations while the flag file exists, as a PACS without
# support for that SOP class does: Orthanc 1.10's STOW-RS still lists the dropped instance as stored.
_PICKY_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("%s", "r")
  if f ~= nil then
    f:close()
    return dicom.SOPClassUID ~= "1.2.840.10008.5.1.4.1.1.91.1"
  end
  return true
end
"""


def test_stow_that_leaves_an_object_out_fails_and_a_rerun_adds_only_it(gateway, ports, slide, tmp_path) -> None:
    """A STOW-RS the PACS answers with success but keeps only part of: the job fails naming the missing object
    (checked back by QIDO-RS), and once the PACS takes it, a re-run stores that object alone, nothing twice."""
    url, _ = gateway
    study, series, files = slide
    flag = tmp_path / "refuse-annotations"
    flag.touch()
    with run_orthanc(port=ports["picky"], lua=_PICKY_LUA % flag) as pacs, _client(url) as c:
        pacs.upload(files)
        before = pacs.count()
        body = {"pacs": "picky", "study_uid": study, "series_uid": series, "tasks": ["classification"]}
        job = _analyse(c, **body)
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "pacs_store_incomplete", job
        message = job["error"]["message"]
        assert "kept 2 of 3 objects" in message and "Microscopy Bulk Simple Annotations" in message, message
        assert "after 2 tries" in message
        assert c.get(f"/jobs/{job['id']}/dicom").status_code == 409  # not announced as results
        assert pacs.count() == before + 2  # the SR and the SEG are in the study; DICOMweb cannot take them back

        flag.unlink()  # the PACS now takes annotations: a re-run completes the set without duplicates
        r = c.post("/pacs/analyses", json=body, headers={"Idempotency-Key": "after-the-pacs-was-fixed"})
        rerun = _wait(c, r.json()["id"])
        assert rerun["state"] == "succeeded", rerun
        objects = c.get(f"/jobs/{rerun['id']}/result").json()["dicom"]["objects"]
        assert set(objects) == {"mstar-sr.dcm", "mstar-seg.dcm", "mstar-ann.dcm"}
        assert pacs.count() == before + 3  # only the annotations were added


@pytest.fixture(scope="module")
def odd_series(orthanc, cmu_svs, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A study without SM series, a series of LABEL images only, and a series whose frames do not decode."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    root = tmp_path_factory.mktemp("odd")
    out: dict[str, tuple[str, str]] = {}
    sc = pydicom.Dataset()
    sc.file_meta = FileMetaDataset()
    sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.SOPClassUID = SecondaryCaptureImageStorage
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sc.StudyInstanceUID, sc.SeriesInstanceUID = generate_uid(), generate_uid()
    sc.Modality, sc.PatientID = "OT", "X"
    sc.Rows = sc.Columns = 8
    sc.SamplesPerPixel, sc.PhotometricInterpretation = 1, "MONOCHROME2"
    sc.BitsAllocated = sc.BitsStored = 8
    sc.HighBit, sc.PixelRepresentation = 7, 0
    sc.PixelData = bytes(64)
    sc.save_as(root / "sc.dcm", enforce_file_format=True)
    orthanc.upload([root / "sc.dcm"])
    out["no_sm"] = (str(sc.StudyInstanceUID), str(sc.SeriesInstanceUID))

    labels = dicomize(cmu_svs, root / "label", image_type="ORIGINAL\\PRIMARY\\LABEL\\NONE", levels=1)
    orthanc.upload(labels)
    out["no_volume"] = _uids(labels)

    good = dicomize(cmu_svs, root / "bad-frames", levels=2)
    study, series = generate_uid(), generate_uid()
    bad = []
    for f in good:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        junk = b"\xff\xd8\xff\xdb" + bytes(range(256)) * 2  # a JPEG start, then nothing a decoder accepts
        ds.PixelData = encapsulate([junk] * int(ds.NumberOfFrames))
        ds.save_as(f.with_suffix(".bad.dcm"), enforce_file_format=True)
        bad.append(f.with_suffix(".bad.dcm"))
    orthanc.upload(bad)
    out["bad_frames"] = (str(study), str(series))
    return out


@pytest.mark.parametrize(
    ("pacs", "which", "code", "words"),
    [
        ("wrong-password", "slide", "pacs_unauthorized", "401"),
        ("forbidden", "slide", "pacs_forbidden", "403"),
        ("missing", "slide", "pacs_not_found", "404"),
        ("broken", "slide", "pacs_unavailable", "500"),
        ("garbled", "slide", "pacs_bad_response", "not valid DICOMweb"),
        ("hangs", "slide", "pacs_timeout", "timeout"),
        ("main", "no_sm", "no_slide_series", "no slide microscopy"),
        ("main", "no_volume", "no_volume_image", "VOLUME"),
        ("main", "bad_frames", "corrupt_slide", "cannot be decoded"),
        ("no-stow", "slide", "pacs_not_found", "STOW-RS"),
        ("frames-fail", "slide", "pacs_unavailable", "PACS 'frames-fail' frame ("),
        ("frames-hang", "slide", "pacs_timeout", "PACS 'frames-hang' frame ("),
    ],
)
def test_pacs_faults_fail_the_job_with_a_reason(gateway, orthanc, slide, odd_series, pacs, which, code, words) -> None:
    url, _ = gateway
    study, series = slide[:2] if which == "slide" else odd_series[which]
    count = orthanc.count()
    with _client(url) as c:
        t = time.monotonic()
        job = _analyse(c, pacs=pacs, study_uid=study, series_uid=series, tasks=["classification"])
        assert time.monotonic() - t < 60
        assert job["state"] == "failed", job
        assert job["error"]["code"] == code, job
        assert words in job["error"]["message"], job
        _no_phi(json.dumps(job))
        assert c.get(f"/jobs/{job['id']}/dicom").status_code == 409  # nothing half-stored or served
    assert orthanc.count() == count  # and nothing written into the PACS


def test_fhir_endpoint_that_stays_down_fails_the_job_after_retries(gateway, slide) -> None:
    url, _ = gateway
    _Faults.hits.pop("s502", None)
    with _client(url, CLINIC_KEY) as c:
        job = _analyse(c, pacs="clinic-pacs", study_uid=slide[0], series_uid=slide[1], tasks=["classification"])
    assert job["state"] == "failed" and job["error"]["code"] == "fhir_delivery_failed", job
    assert "HTTP 502" in job["error"]["message"] and "2 tries" in job["error"]["message"]
    assert _Faults.hits["s502"] == 2


def test_fhir_post_retries_then_succeeds_with_one_conditional_create() -> None:
    """The LIS answers 503, then 429, then 201: three POSTs of the same validated report, each a conditional
    create on the job identifier, so a retry of a POST the LIS did take files nothing twice; a 400 is final."""
    from service.pacs.config import FhirEndpoint
    from service.pacs.fhir import diagnostic_report, post_report

    result = {
        "bundle": {"name": "tiny", "models": {"enc": {"version": "1", "sha256": "ab" * 32}}},
        "classification": {"subtype": {"label": "LUAD", "probabilities": {"LUAD": 0.7, "LUSC": 0.3}}},
        "survival": {"os": {"risk": [0.25]}},
        "report": {"text": "Adenocarcinoma, acinar pattern."},
    }
    report = diagnostic_report("job123", result, study_uid="1.2.3", bundle_version="abc")
    with webhook_receiver(statuses=(503, 429, 201)) as (url, got):
        endpoint = FhirEndpoint(tenant="t", url=url.rsplit("/", 1)[0], attempts=3, backoff_s=0.01)
        assert post_report(endpoint, report) == 201
    assert len(got) == 3
    assert {h["If-None-Exist"] for h, _ in got} == {"identifier=urn:mstar:job|job123"}
    assert all(json.loads(body) == report for _, body in got)
    with webhook_receiver(statuses=(400,)) as (url, got):
        endpoint = FhirEndpoint(tenant="t", url=url.rsplit("/", 1)[0], attempts=3, backoff_s=0.01)
        with pytest.raises(httpx.HTTPStatusError):
            post_report(endpoint, report)
    assert len(got) == 1


def test_api_refuses_unknown_servers_and_shows_no_secrets(gateway) -> None:
    url, _ = gateway
    with _client(url) as c:
        r = c.post("/pacs/analyses", json={"pacs": "other-tenant", "study_uid": "1.2.3"})
        assert r.status_code == 404  # another tenant's server is as unknown as a missing one
        r = c.post("/pacs/analyses", json={"pacs": "main", "study_uid": "1.2.3; DROP"})
        assert r.status_code == 422
        r = c.post("/pacs/analyses", json={"pacs": "main", "study_uid": "1.2.3", "url": "http://evil"})
        assert r.status_code == 422  # no request can name an address
        assert c.get("/pacs/servers").status_code == 403
    with _client(url, ADMIN_KEY) as c:
        listed = c.get("/pacs/servers")
    assert listed.status_code == 200
    names = {s["name"] for s in listed.json()["servers"]}
    assert "main" in names and "other-tenant" not in names
    assert "s3cret" not in listed.text and "nope" not in listed.text
    assert next(s for s in listed.json()["servers"] if s["name"] == "main")["has_password"] is True


def test_stow_retries_with_backoff_then_fails(faults) -> None:
    from service.pacs.client import PacsUnavailableError, make_client
    from service.pacs.config import PacsServer
    from service.pacs.writeback import store_with_retry

    _Faults.hits.pop("s503", None)
    server = PacsServer(name="x", tenant="t", url=f"{faults}/s503", stow_attempts=3, stow_backoff_s=0.1)
    client, _ = make_client(server)
    t = time.monotonic()
    with pytest.raises(PacsUnavailableError, match="after 3 tries"):
        store_with_retry(client, server, [_tiny_sr()], "1.2.3")
    assert _Faults.hits["s503"] == 3
    assert time.monotonic() - t >= 0.3  # 0.1 + 0.2 s of backoff


def _tiny_sr():
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", generate_uid()
    return ds


def test_watcher_submits_each_new_series_once_across_restarts(gateway, ports, cmu_svs, tmp_path) -> None:
    from service.pacs.config import PacsSettings
    from service.pacs.watch import WatchState, gateway_submitter, poll_once

    url, _ = gateway
    with run_orthanc(port=ports["watched"]) as pacs, _client(url) as c:
        server = PacsSettings().server("hospital", "watched")
        submit = gateway_submitter(url, KEY, "watched")
        state_file = tmp_path / "watch.db"
        first = dicomize(cmu_svs, tmp_path / "a", levels=2)
        pacs.upload(first)
        done = poll_once(server, WatchState(state_file), submit)
        assert [x[:2] for x in done] == [_uids(first)]
        assert poll_once(server, WatchState(state_file), submit) == []  # a restart: nothing again
        second = dicomize(cmu_svs, tmp_path / "b", levels=2)
        pacs.upload(second)
        later = poll_once(server, WatchState(state_file), submit)
        assert [x[:2] for x in later] == [_uids(second)]
        assert poll_once(server, WatchState(state_file), submit) == []
        for _study, _series, job_id in done + later:
            job = _wait(c, job_id)
            assert job["state"] == "succeeded", job
        # a crash between submit and record: the gateway's idempotency key gives back the same job
        assert submit(*_uids(first)) == done[0][2]
        # the command itself, restarted on the same state file: nothing new
        from click.testing import CliRunner

        from service.cli import main

        args = ["pacs", "watch", "--pacs", "watched", "--tenant", "hospital", "--gateway", url, "--api-key", KEY]
        res = CliRunner().invoke(main, [*args, "--state", str(state_file), "--once"])
        assert res.exit_code == 0 and "submitted 0 new series" in res.output, res.output
        res = CliRunner().invoke(main, [*args, "--state", str(tmp_path / "fresh.db"), "--once"])
        assert res.exit_code == 0 and "submitted 2 new series" in res.output, res.output  # same jobs, by key
        rows = [line.split() for line in res.output.splitlines()]
        jobs = {r[2] for r in rows if len(r) == 3 and len(r[2]) == 32 and r[0][0].isdigit()}
        assert jobs == {x[2] for x in done + later}


def test_watcher_skips_a_series_the_gateway_refuses_and_submits_the_rest(gateway, ports, tmp_path) -> None:
    """A PACS series whose study UID is not a DICOM UID (seen in the wild: letters in a UID) is refused by the
    gateway (422); the watcher logs it, submits the other new series and records only those."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from service.pacs.config import PacsSettings
    from service.pacs.watch import WatchState, gateway_submitter, poll_once, slide_series

    url, _ = gateway
    files, uids = [], []
    for n, study in enumerate(["1.2.826.0.1.3680043.8.498.1a", "1.2.826.0.1.3680043.8.498.2"]):  # bad, good
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, generate_uid(), "SM", "X"
        ds.save_as(tmp_path / f"{n}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"{n}.dcm")
        uids.append((study, str(ds.SeriesInstanceUID)))
    with run_orthanc(port=ports["watched"]) as pacs:
        pacs.upload(files)
        server = PacsSettings().server("hospital", "watched")
        assert sorted(slide_series(server)) == sorted(uids)  # the PACS lists both
        state = WatchState(tmp_path / "watch.db")
        submit = gateway_submitter(url, KEY, "watched")
        for _ in range(2):  # the refused series stays unrecorded and refused; the good one is submitted once
            refused: list = []
            done = poll_once(server, state, submit, refused=refused)
            assert [x[:2] for x in done] == ([uids[1]] if _ == 0 else [])
            assert [x[:2] for x in refused] == [uids[0]] and "HTTP 422" in refused[0][2]
        assert state.seen("watched") == {uids[1][1]}
        # `--once` (a cron job, a systemd timer) ends with status 1 while a series is left unsubmitted
        from click.testing import CliRunner

        from service.cli import main

        args = ["pacs", "watch", "--pacs", "watched", "--tenant", "hospital", "--gateway", url, "--api-key", KEY]
        res = CliRunner().invoke(main, [*args, "--state", str(tmp_path / "watch.db"), "--once"])
        assert res.exit_code == 1 and "1 series not submitted" in res.output, res.output


def test_orthanc_lua_trigger_posts_new_series_once(gateway, ports, cmu_svs, tmp_path) -> None:
    """The documented trigger (deploy/orthanc/mstar-trigger.lua) in a real Orthanc: storing a slide series
    makes Orthanc ask the gateway for an analysis once the series is stable; storing it again adds no job."""
    url, _ = gateway
    lua = (Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "mstar-trigger.lua").read_text()
    env = {"MSTAR_GATEWAY_URL": url, "MSTAR_TRIGGER_API_KEY": KEY, "MSTAR_TRIGGER_PACS": "trigger"}
    with run_orthanc(lua=lua, stable_age_s=1, env=env, port=ports["trigger"]) as pacs, _client(url) as c:
        files = dicomize(cmu_svs, tmp_path / "t", levels=2)
        before = {j["id"] for j in c.get("/jobs", params={"limit": 200}).json()["items"]}

        def new_jobs() -> list[dict]:
            return [j for j in c.get("/jobs", params={"limit": 200}).json()["items"] if j["id"] not in before]

        pacs.upload(files)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not new_jobs():
            time.sleep(0.5)
        jobs = new_jobs()
        assert len(jobs) == 1, (pacs.root / "orthanc.log").read_text()[-3000:]
        job = _wait(c, jobs[0]["id"])
        assert job["state"] == "succeeded", job
        result = c.get(f"/jobs/{job['id']}/result").json()
        assert result["source"]["series_uid"] == _uids(files)[1] and result["dicom"]["stored"] is True
        default = {"mstar-sr.dcm", "mstar-seg.dcm", "mstar-ann.dcm", "mstar-report-sr.dcm"}
        assert set(result["dicom"]["objects"]) == default  # no `heatmap` in its configuration: seg only
        pacs.upload(files)  # the same series again: Orthanc may fire again; the gateway returns the same job
        time.sleep(3)
        assert [j["id"] for j in new_jobs()] == [job["id"]]


# ---- Celery mode and privacy: `mstar serve` + `mstar worker` as real processes, JSON logs captured ----------


@pytest.fixture(scope="module")
def celery_stack(orthanc, faults, bundle_dir, postgres_url, redis_server, tmp_path_factory):  # noqa: F811
    """The gateway (`mstar serve`) and one Celery worker (`mstar worker`) as processes on real Redis and
    PostgreSQL, both logging JSON at debug level into files the test reads. The main server writes the
    heatmap as a Parametric Map only (`heatmap: pmap`), the other choice than the embedded tests' `both`."""
    import os
    from types import SimpleNamespace

    import redis
    from services import mstar_serve, mstar_worker

    root = tmp_path_factory.mktemp("celery-pacs")
    db = fresh_database(postgres_url, "mstar_pacs")
    broker = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of our own on the shared server
    redis.Redis.from_url(broker).flushdb()
    user, pw = next(iter(USERS.items()))
    servers = [
        _server("main", orthanc.url, auth="basic", username=user, password=pw, heatmap="pmap", read_timeout_s=10),
        _server("wrong-password", orthanc.url, auth="basic", username=user, password="nope"),
        _server("no-stow", orthanc.url, auth="basic", username=user, password=pw, stow_prefix="no-such-stow"),
    ]
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "MSTAR_DATA_DIR": str(root / "data"),
        "MSTAR_DATABASE_URL": db,
        "MSTAR_BROKER_URL": broker,
        "MSTAR_BUNDLE_DIR": str(bundle_dir),
        "MSTAR_LOG_FORMAT": "json",
        "MSTAR_LOG_LEVEL": "debug",
        "MSTAR_API_KEYS": json.dumps([{"tenant": "hospital", "key": KEY}]),
        "MSTAR_PACS_SERVERS": json.dumps(servers),
    }
    with (
        mstar_worker(env, "pacs", root / "worker.log", ["--metrics-port", str(metrics_port)], stop_timeout=15),
        mstar_serve(env, port=port, log=root / "gateway.log", timeout=120) as gateway,
    ):
        yield SimpleNamespace(
            url=gateway.url,
            root=root,
            db=db,
            worker_metrics=f"http://127.0.0.1:{metrics_port}/metrics",
            data=root / "data",
        )


def _all_rows(db_url: str) -> dict[str, list[str]]:
    """Every row of every table of the service's database, each as text (all columns)."""
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(db_url)
    meta = MetaData()
    meta.reflect(engine)
    try:
        with engine.connect() as conn:
            return {name: [repr(tuple(r)) for r in conn.execute(select(t))] for name, t in meta.tables.items()}
    finally:
        engine.dispose()


def test_celery_pacs_job_round_trip_and_no_patient_data_anywhere(celery_stack, orthanc, slide, odd_series) -> None:
    """One PACS analysis and four failing PACS jobs through the gateway and a real Celery worker; the source
    series carry a patient name, ID, birth date and accession number. Those values appear in no log line,
    no database row (jobs, slides, results, audit events: all columns), no metrics exposition, no error and no
    result file, only in the DICOM objects written back into the study (which DICOM requires)."""
    import highdicom as hd

    study, series, files = slide
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    for attr, value in PHI.items():  # the premise: the slide series does carry patient data
        assert str(getattr(src, attr)) == value
    stack = celery_stack
    with _client(stack.url) as c:
        # the options differ from the embedded tests' (no report), so every object here is new to the study
        job = _analyse(c, pacs="main", study_uid=study, series_uid=series, tasks=["classification", "survival"])
        assert job["state"] == "succeeded", job
        result = c.get(f"/jobs/{job['id']}/result").json()
        cases = [  # refused, refused at STOW after the whole analysis, labels only, frames that do not decode
            ("wrong-password", (study, series)),
            ("no-stow", (study, series)),
            ("main", odd_series["no_volume"]),
            ("main", odd_series["bad_frames"]),
        ]
        failed = [
            _analyse(c, pacs=name, study_uid=uids[0], series_uid=uids[1], tasks=["classification"])
            for name, uids in cases
        ]
        assert [(f["state"], f["error"]["code"]) for f in failed] == [
            ("failed", "pacs_unauthorized"),
            ("failed", "pacs_not_found"),
            ("failed", "no_volume_image"),
            ("failed", "corrupt_slide"),
        ], failed
        zipped = c.get(f"/jobs/{job['id']}/dicom")
        assert zipped.status_code == 200
        gateway_metrics = c.get("/metrics").text
    worker_metrics = httpx.get(stack.worker_metrics, timeout=10).text
    assert "mstar_" in gateway_metrics and "mstar_" in worker_metrics

    # Celery mode wrote the objects into the same study: QIDO-RS finds each of result.json's instances
    dicom = result["dicom"]
    assert dicom["stored"] is True
    assert set(dicom["objects"]) == {"mstar-sr.dcm", "mstar-pmap.dcm", "mstar-ann.dcm"}  # heatmap: pmap
    dw = _dicomweb(orthanc)
    for o in dicom["objects"].values():
        hits = dw.search_for_instances(study, o["series_instance_uid"])
        assert [h["00080018"]["Value"][0] for h in hits] == [o["sop_instance_uid"]]
    o = dicom["objects"]["mstar-pmap.dcm"]
    pmap = hd.pm.ParametricMap.from_dataset(
        dw.retrieve_instance(study, o["series_instance_uid"], o["sop_instance_uid"])
    )
    assert pmap.pixel_array.dtype.kind == "f"

    # the DICOM objects carry the patient module (same study), and only they
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
        for name in zf.namelist():
            ds = pydicom.dcmread(io.BytesIO(zf.read(name)), stop_before_pixels=True)
            assert str(ds.PatientName) == PHI["PatientName"] and ds.PatientID == PHI["PatientID"], name

    def leaks(text: str) -> list[str]:
        return [v for v in PHI.values() if v in text]

    # logs: JSON lines from both processes, the job's own lines among them
    lines = []
    for name in ("gateway", "worker"):
        text = (stack.root / f"{name}.log").read_text(errors="replace")
        assert not leaks(text), f"{name} log: {leaks(text)}"
        lines += [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert any(line.get("job_id") == job["id"] for line in lines)
    # every row of the database: jobs (all columns, error messages included), slides, results, audit events
    rows = _all_rows(stack.db)
    assert rows["audit_events"] and any(job["id"] in r and "pacs@test" in r for r in rows["jobs"])  # ran on Celery
    for table, values in rows.items():
        assert not leaks("\n".join(values)), f"table {table}: {leaks(chr(10).join(values))}"
    for text in (gateway_metrics, worker_metrics, json.dumps(result), *(json.dumps(f) for f in failed)):
        assert not leaks(text)
    # every file the service keeps (results, scratch, metrics files) but the DICOM objects, which do carry them
    # (so the byte scan below would see a value stored in the clear)
    assert [p for p in stack.data.rglob("*.dcm") if PHI["PatientID"].encode() in p.read_bytes()]
    checked = 0
    for path in stack.data.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            blob = path.read_bytes()
            assert not [v for v in PHI.values() if v.encode() in blob], path
            checked += 1
    assert checked > 5
