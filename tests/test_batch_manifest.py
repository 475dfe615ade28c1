"""Batch manifests and batch bookkeeping on a real (SQLite) store, DICOM WSI folders on both submission paths
(`--broker`: `BatchService`; `--server`: `HttpBatch` against a live gateway); the Celery path is in
test_worker_celery.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.batch import BatchService, default_batch_id, parse_manifest
from service.config import Settings
from service.errors import InvalidParameterError
from service.jobs.lifecycle import finish_unowned as finish_job
from service.store.db import transaction
from service.store.models import Job, Slide


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parse_resolves_paths_names_mpp_and_metadata(tmp_path, cmu_svs):
    m = _write(
        tmp_path / "m.csv",
        f"Slide,ID,mpp,label\n{cmu_svs},a,0.25,tumour\nsub/x.svs,,,\nfile:///data/y.svs,c,,\nhttps://h/z.svs,d,,\n\n",
    )
    rows = parse_manifest(m)
    assert [r.source for r in rows] == [
        str(cmu_svs.resolve()),
        str((tmp_path / "sub/x.svs").resolve()),
        "/data/y.svs",
        "https://h/z.svs",
    ]
    assert [r.name for r in rows] == ["a", "x.svs", "c", "d"]
    assert rows[0].mpp_override == 0.25 and rows[0].meta == {"label": "tumour"} and rows[1].meta == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name,label\na,b\n", "needs a column"),
        ("slide\n", "lists no slides"),
        ("slide\na.svs\n./a.svs\n", "repeats line 2"),
        ("slide,mpp\na.svs,fast\n", "not a number"),
        ("slide,mpp\na.svs,0\n", "out of range"),
        ("slide\nftp://h/a.svs\n", "unsupported URI scheme"),
    ],
)
def test_parse_refuses_bad_manifests(tmp_path, text, match):
    with pytest.raises(InvalidParameterError, match=match):
        parse_manifest(_write(tmp_path / "m.csv", text))
    with pytest.raises(InvalidParameterError, match="does not exist"):
        parse_manifest(tmp_path / "nope.csv")


class _Published(list):
    """Collects what `submit` publishes (the broker round trip is covered by the integration tests)."""

    def notify(self, job_id: str, *, queue: str | None = None) -> None:
        self.append((job_id, queue))


def test_submit_dedups_slides_and_resubmission_skips_done(tmp_path, cmu_svs):
    (tmp_path / "a.svs").write_bytes(cmu_svs.read_bytes())
    (tmp_path / "b.svs").write_bytes(cmu_svs.read_bytes() + b"x")
    (tmp_path / "notaslide.svs").write_bytes(b"hello")
    m = _write(tmp_path / "m.csv", "slide\na.svs\nb.svs\nmissing.svs\nnotaslide.svs\n")
    svc = BatchService(Settings(data_dir=tmp_path / "data"))
    try:
        pub = _Published()
        rep = svc.submit(m, tenant="lab", queue=pub)
        assert rep.batch_id == default_batch_id("lab", m) and len(rep.queued) == 2 and rep.failed_ingest == 2
        assert {q for _, q in pub} == {"batch"} and [j for j, _ in pub] == rep.queued
        st = svc.status(rep.batch_id)
        assert st.counts() | {} == {
            "total": 4,
            "queued": 2,
            "running": 0,
            "succeeded": 0,
            "failed": 2,
            "canceled": 0,
            "remaining": 2,
        }
        reasons = {it.name: it.error_code for it in st.items}
        assert reasons["missing.svs"] == "slide_not_found" and reasons["notaslide.svs"] == "unsupported_format"

        pub2 = _Published()  # nothing ran yet: queued jobs are re-published, not duplicated
        again = svc.submit(m, tenant="lab", queue=pub2)
        assert again.queued == [] and again.in_flight == 2 and sorted(j for j, _ in pub2) == sorted(rep.queued)

        with transaction(svc.sessions) as s:
            finish_job(s, rep.queued[0], "succeeded")
            finish_job(s, rep.queued[1], "failed", error_code="corrupt_slide", error_message="bad tile")
        third = svc.submit(m, tenant="lab", queue=_Published())
        assert third.skipped_done == 1 and len(third.queued) == 1 and third.queued[0] != rep.queued[1]
        with transaction(svc.sessions) as s:
            assert s.get(Job, third.queued[0]).state == "queued"
        assert len(svc.status(rep.batch_id).items) == 4  # same items, the failed one has a new job

        out = Path(svc.results(rep.batch_id, tmp_path / "out"))
        lines = out.read_text().splitlines()
        assert lines[0].startswith("idx,name,source,state,error_code,reason") and len(lines) == 5
        with pytest.raises(InvalidParameterError, match="another tenant"):
            svc.submit(m, tenant="other", batch_id=rep.batch_id)
    finally:
        svc.close()


def _copy_dir(src: Path, dest: Path, rename: bool = False) -> Path:
    """A writable copy (the shared sample is read-only), optionally with other file names."""
    dest.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copyfile(f, dest / (f"part{i:02d}.bin" if rename else f.name))
    return dest


def _two_series(src: Path, dest: Path) -> Path:
    """A copy of the DICOM WSI folder whose smallest level claims to belong to another series."""
    import pydicom

    _copy_dir(src, dest)
    path = dest / "level-11-frames-0-1.dcm"
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    return dest


def _bad_folders(root: Path, dicom_dir: Path) -> dict[str, Path]:
    (root / "empty").mkdir(parents=True)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a slide")
    (root / "notes" / "x.svs").write_bytes(b"II*\x00" + b"\x00" * 200)
    return {"empty": root / "empty", "notes": root / "notes", "two": _two_series(dicom_dir, root / "two")}


BAD_REASONS = {"empty": "is empty", "notes": "no DICOM files", "two": "2 DICOM WSI series"}


def test_dicom_folders_are_batch_slides_and_bad_folders_fail_their_line(tmp_path, dicom_dir, cmu_svs):
    from service.jobs import lifecycle
    from service.jobs.execute import execute_job
    from service.slides.open import open_slide

    bad = _bad_folders(tmp_path / "bad", dicom_dir)
    renamed = _copy_dir(dicom_dir, tmp_path / "renamed", rename=True)  # the same series under other names
    (tmp_path / "a.svs").write_bytes(cmu_svs.read_bytes())
    single = dicom_dir / "level-0-frames-0-30.dcm"
    m = _write(
        tmp_path / "m.csv",
        "slide,id\n"
        f"{dicom_dir},dicom\nfile://{renamed},renamed\n{bad['empty']},empty\n{bad['notes']},notes\n"
        f"{bad['two']},two\n{single},single\na.svs,svs\n",
    )
    settings = Settings(data_dir=tmp_path / "data", pipeline="runner_pipelines:tiny")
    svc = BatchService(settings)
    try:
        rep = svc.submit(m, tenant="lab", queue=_Published())
        assert len(rep.queued) == 3 and rep.failed_ingest == 4  # the rest of the batch goes on
        items = {it.name: it for it in svc.status(rep.batch_id).items}
        for name, reason in BAD_REASONS.items():
            assert items[name].state == "failed" and items[name].error_code == "unsupported_format"
            assert reason in items[name].reason and items[name].reason.startswith(f"{name}: ")
        assert "folder on the manifest line" in items["single"].reason
        assert items["dicom"].slide_id == items["renamed"].slide_id  # one slide per series and tenant
        with transaction(svc.sessions) as s:
            slide = s.get(Slide, items["dicom"].slide_id)
            assert (slide.format, slide.size_bytes) == ("dicom-dir", sum(f.stat().st_size for f in dicom_dir.iterdir()))
            key = slide.blob_key
            lease = lifecycle.claim_fair(s, "test-worker")
        stored = svc.blobs.local_path(key)
        assert sorted(p.name for p in stored.iterdir()) == [f"{i:04d}.dcm" for i in range(12)]
        with open_slide(stored) as got, open_slide(dicom_dir) as ref:
            assert got.level_dimensions == ref.level_dimensions and got.mpp == ref.mpp
        assert lease.job_id == items["dicom"].job_id
        assert execute_job(lease, settings).state == "succeeded"  # the worker's code path opens the folder
        again = svc.submit(m, tenant="lab", queue=_Published())
        assert again.skipped_done == 1 and again.failed_ingest == 4 and again.in_flight == 2
    finally:
        svc.close()


def test_dicom_folders_through_the_http_gateway(tmp_path, dicom_dir):
    """`mstar submit --server`: a DICOM folder goes up as one ZIP and runs; bad folders fail their line before
    any upload, and the server refuses a ZIP that is not one series with the reason."""
    import zipfile

    import httpx
    from services import live_server

    from service.api import create_app
    from service.batch_http import HttpBatch

    key = "lab-key-0123456789abcdef"
    bad = _bad_folders(tmp_path / "bad", dicom_dir)
    m = _write(tmp_path / "m.csv", f"slide,id\n{dicom_dir},dicom\n{bad['empty']},empty\n{bad['two']},two\n")
    settings = Settings(
        data_dir=tmp_path / "srv",
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.1,
        api_keys=[{"tenant": "lab", "key": key}],
    )
    with live_server(create_app(settings)) as url:
        hb = HttpBatch(url, key, tmp_path / "state")
        first = hb.submit(m)
        assert first["queued"] == 1 and first["failed_ingest"] == 2
        assert hb.follow(first["batch_id"], poll_s=0.2)["succeeded"] == 1
        items = {it["name"]: it for it in hb.status(first["batch_id"])}
        assert items["dicom"]["state"] == "succeeded"
        for name in ("empty", "two"):
            assert items[name]["error_code"] == "unsupported_format" and BAD_REASONS[name] in items[name]["reason"]

        def zipped(folder: Path, name: str) -> bytes:
            with zipfile.ZipFile(tmp_path / name, "w") as zf:
                for f in sorted(folder.iterdir()):
                    zf.write(f, arcname=f"{folder.name}/{f.name}")
            return (tmp_path / name).read_bytes()

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            sid = c.get(f"/jobs/{items['dicom']['job_id']}").json()["slide_id"]
            slide = c.get(f"/slides/{sid}").json()
            assert slide["format"] == "dicom-dir"
            same = c.post(  # the same series zipped by hand, deflated, under other names: the same slide
                "/slides", files={"file": ("s.zip", zipped(dicom_dir, "same.zip"))}, data={"analyze": "false"}
            )
            assert same.status_code == 200 and same.json()["id"] == sid
            for name, body, status, code, reason in [
                ("two.zip", zipped(bad["two"], "two.zip"), 415, "unsupported_format", "2 DICOM WSI series"),
                ("notes.zip", zipped(bad["notes"], "notes.zip"), 415, "unsupported_format", "no DICOM files"),
                ("broken.zip", b"PK\x03\x04" + b"\x00" * 64, 415, "unsupported_format", "cannot be unpacked"),
            ]:
                r = c.post("/slides", files={"file": (name, body)}, data={"analyze": "false"})
                err = r.json()["error"]
                assert (r.status_code, err["code"]) == (status, code) and reason in err["message"], r.text
            folders = list((settings.blob_dir / "slides").glob("*/*.dcmdir"))
            assert len(folders) == 1
            assert c.delete(f"/slides/{sid}").status_code == 204
            assert not folders[0].exists()
    assert not [p for p in (settings.blob_dir / ".staging").iterdir()]  # nothing left half-staged


def test_a_line_without_a_job_is_failed_with_its_reason_and_a_resubmission_runs_it(tmp_path, cmu_svs):
    """A line whose job went with its deleted slide, or whose submit was killed mid-ingest, read `queued` for ever,
    and `mstar submit --wait` never returned. Such a line is now failed with the reason, and submitting the
    manifest again gives it a job."""
    from service.store.batches import BatchItem

    (tmp_path / "a.svs").write_bytes(cmu_svs.read_bytes())
    (tmp_path / "b.svs").write_bytes(cmu_svs.read_bytes() + b"y")
    m = _write(tmp_path / "m.csv", "slide\na.svs\nb.svs\n")
    svc = BatchService(Settings(data_dir=tmp_path / "data"))
    try:
        rep = svc.submit(m, tenant="lab", queue=_Published())
        with transaction(svc.sessions) as s:
            s.delete(s.get(Job, rep.queued[0]))  # gone with its slide
            item = s.get(BatchItem, (rep.batch_id, 1))
            item.job_id = item.slide_id = None  # the submit adding it was killed before its job existed
        st = svc.status(rep.batch_id)
        assert st.counts()["remaining"] == 0 and st.counts()["failed"] == 2
        why = {it.name: (it.state, it.error_code, it.reason) for it in st.items}
        assert why["a.svs"][:2] == why["b.svs"][:2] == ("failed", "no_job") and "slide was deleted" in why["a.svs"][2]
        assert "submit the manifest again" in why["b.svs"][2]
        again = svc.submit(m, tenant="lab", queue=_Published())
        assert len(again.queued) == 2 and svc.status(rep.batch_id).counts()["queued"] == 2
    finally:
        svc.close()


def test_a_server_batch_record_survives_a_wrong_key_another_tenant_and_a_server_down(tmp_path, cmu_svs):
    """`mstar submit --server` took any non-200 for a failed job: resubmitting with a wrong or revoked key replaced
    every finished line's job with `unauthorized` (exit 0), another tenant's key re-uploaded every slide into that
    tenant, and a server down was a traceback. Each now stops with one reason and leaves the record as it was."""
    from services import free_port, live_server

    from service.api import create_app
    from service.batch_http import HttpBatch
    from service.errors import MstarError

    key_a, key_b = "lab-a-key-0123456789abcdef", "lab-b-key-0123456789abcdef"
    (tmp_path / "a.svs").write_bytes(cmu_svs.read_bytes())
    m = _write(tmp_path / "m.csv", "slide,site\na.svs,left lung\n")
    settings = Settings(
        data_dir=tmp_path / "srv",
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.1,
        api_keys=[{"tenant": "a", "key": key_a}, {"tenant": "b", "key": key_b}],
    )
    state = tmp_path / "state"
    with live_server(create_app(settings)) as url:
        first = HttpBatch(url, key_a, state)
        batch = first.submit(m)["batch_id"]
        assert first.follow(batch, poll_s=0.2)["succeeded"] == 1
        # the summary has the --broker summary's columns (it lacked patches, seconds, slide id, manifest metadata)
        import csv

        rows = list(csv.DictReader(first.results(batch, tmp_path / "out").open()))
        assert list(rows[0])[:12] == [
            "idx", "name", "source", "state", "error_code", "reason", "attempts", "n_patches", "seconds",
            "features", "job_id", "slide_id",
        ]  # fmt: skip
        assert rows[0]["meta_site"] == "left lung" and int(rows[0]["n_patches"]) > 0 and float(rows[0]["seconds"]) > 0
        assert rows[0]["slide_id"] and rows[0]["features"].startswith("features/")
        record = (state / f"{batch}.json").read_bytes()
        for other in ("wrong-key-0123456789abcdef", key_b):
            with pytest.raises(InvalidParameterError, match="submitted with another API key"):
                HttpBatch(url, other, state).submit(m)
        fresh = _write(tmp_path / "m2.csv", "slide\na.svs\n")
        with pytest.raises(MstarError) as err:  # a refused key stops the submit: no line is recorded as failed
            HttpBatch(url, "wrong-key-0123456789abcdef", state).submit(fresh)
        assert err.value.code == "unauthorized" and len(list(state.iterdir())) == 1
        assert (state / f"{batch}.json").read_bytes() == record
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_b}"}) as c:
            assert c.get("/slides").json()["total"] == 0  # nothing uploaded into the other tenant
    down = HttpBatch(f"http://127.0.0.1:{free_port()}", key_a, state)
    with pytest.raises(MstarError) as err:
        down.status(batch)
    assert err.value.code == "server_unreachable" and (state / f"{batch}.json").read_bytes() == record


def test_two_submits_of_one_manifest_at_once_never_run_a_line_twice(tmp_path, cmu_svs, monkeypatch):
    """Two `mstar submit` runs of one manifest at once: one ended in a raw IntegrityError traceback, and a line
    got two jobs, the second running untracked. Here a second submit runs whole while the first is ingesting
    its first line: the first then finds every line taken, gives none a second job, and says why it stops."""
    from service.store.batches import BatchItem

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.svs").write_bytes(cmu_svs.read_bytes() + name.encode())
    m = _write(tmp_path / "m.csv", "slide\na.svs\nb.svs\nc.svs\n")
    svc = BatchService(Settings(data_dir=tmp_path / "data"))
    real_ingest, nested = svc._ingest, []

    def ingest_while_another_submits(tenant_id, row):
        if not nested:
            nested.append(None)  # the second submit ingests through the real method
            monkeypatch.setattr(svc, "_ingest", real_ingest)
            nested[0] = svc.submit(m, tenant="lab", queue=_Published())
        return real_ingest(tenant_id, row)

    monkeypatch.setattr(svc, "_ingest", ingest_while_another_submits)
    try:
        with pytest.raises(InvalidParameterError, match=r"another submit of batch \w+ is adding lines"):
            svc.submit(m, tenant="lab", queue=_Published())
        assert len(nested[0].queued) == 3
        with transaction(svc.sessions) as s:
            jobs = s.scalars(select(Job.id)).all()
            linked = s.scalars(select(BatchItem.job_id)).all()
        assert sorted(jobs) == sorted(linked) and len(jobs) == 3  # one job a line, none untracked
    finally:
        svc.close()
