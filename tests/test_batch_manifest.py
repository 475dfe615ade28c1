"""Batch manifests and batch bookkeeping on a real (SQLite) store; the Celery path is in test_worker_celery.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.batch import BatchService, default_batch_id, parse_manifest
from service.config import Settings
from service.errors import InvalidParameterError
from service.store.db import transaction
from service.store.models import Job
from service.store.repo import finish_job


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
