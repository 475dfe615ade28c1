"""Request ids, JSON logs and the audit log of the gateway, over real HTTP (uvicorn on loopback, embedded runner)."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from services import live_server, wait_job

from service.api import create_app
from service.api.observe import audit_action
from service.config import Settings
from service.obs.logs import configure_logging

KEY_A, KEY_B, KEY_ADMIN = "tenant-a-key-0123456789abcdef", "tenant-b-key-0123456789abcdef", "admin-key-0123456789abc"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("obs"),
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.1,
        api_keys=[
            {"tenant": "a", "key": KEY_A},
            {"tenant": "b", "key": KEY_B},
            {"tenant": "ops", "key": KEY_ADMIN, "admin": True},
        ],
    )
    with live_server(create_app(settings)) as url:
        yield url


def _client(url: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": key} if key else {}, timeout=60)


def _audit(admin: httpx.Client, **params) -> list[dict]:
    deadline = time.monotonic() + 10  # written just after each response: allow the thread a moment
    while True:
        r = admin.get("/audit", params=params)
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        if items or time.monotonic() > deadline:
            return items
        time.sleep(0.05)


def test_request_id_is_echoed_or_made(server) -> None:
    with _client(server, KEY_A) as c:
        assert c.get("/healthz", headers={"X-Request-Id": "abc-123.x"}).headers["x-request-id"] == "abc-123.x"
        made = c.get("/jobs").headers["x-request-id"]
        assert len(made) == 32 and made != c.get("/jobs").headers["x-request-id"]
        hostile = c.get("/jobs", headers={"X-Request-Id": b"a b\xe9<" + b"x" * 80}).headers["x-request-id"]
        assert len(hostile) == 32 and " " not in hostile  # not echoed: replaced by one of ours


def test_every_access_to_tenant_data_is_audited(server, cmu_svs) -> None:
    with _client(server, KEY_A) as a, _client(server, KEY_B) as b, _client(server, KEY_ADMIN) as admin:
        up = a.post(
            "/slides", files={"file": ("patient-name.svs", cmu_svs.read_bytes())}, headers={"X-Request-Id": "up-1"}
        )
        assert up.status_code == 202, up.text
        job_id, slide_id = up.json()["job"]["id"], up.json()["slide"]["id"]
        assert wait_job(a, job_id)["state"] == "succeeded"
        assert a.get(f"/jobs/{job_id}/result").status_code == 200
        assert b.get(f"/jobs/{job_id}").status_code == 404  # another tenant probing: audited as refused
        assert a.delete(f"/slides/{slide_id}").status_code in (200, 204)
        with _client(server, "not-a-real-key-0123456789") as stranger:
            assert stranger.get(f"/jobs/{job_id}").status_code == 401

        events = _audit(admin, resource_id=job_id, limit=500)
        mine = {(e["action"], e["status"], e["tenant_id"] is not None) for e in events}
        assert ("create", 202, True) in mine  # the upload, named by the job it queued
        assert ("read", 200, True) in mine and ("download", 200, True) in mine
        assert ("read", 404, True) in mine and ("read", 401, False) in mine
        created = next(e for e in events if e["action"] == "create")
        assert created["request_id"] == "up-1" and created["client"] == "127.0.0.1"
        assert created["route"] == "/slides" and created["resource"] == "job"
        assert created["key_prefix"] and created["key_prefix"] not in KEY_A[len(created["key_prefix"]) :]
        refused = next(e for e in events if e["status"] == 401)
        assert refused["key_prefix"]  # who tried, by the public half of what they presented
        assert {e["tenant_id"] for e in events if e["status"] in (200, 202)} == {created["tenant_id"]}
        deleted = _audit(admin, resource_id=slide_id, action="delete")
        assert [(e["resource"], e["method"]) for e in deleted] == [("slide", "DELETE")]
        # never patient data: no file names, no paths with names, no query strings
        dump = json.dumps(_audit(admin, limit=500))
        assert "patient-name" not in dump

        # filters: tenant, time window, paging; admins only
        other = _audit(admin, tenant_id=created["tenant_id"], action="download")
        assert other and all(e["action"] == "download" and e["tenant_id"] == created["tenant_id"] for e in other)
        assert admin.get("/audit", params={"since": "2100-01-01T00:00:00Z"}).json()["total"] == 0
        page = admin.get("/audit", params={"limit": 2}).json()
        assert len(page["items"]) == 2 and page["next_offset"] == 2 and page["total"] > 2
        assert a.get("/audit").status_code == 403
        assert admin.get("/audit", params={"action": "update"}).status_code == 422
        # hostile input: clear answers, never a 500
        assert admin.get("/audit", params={"since": "0001-01-01T00:00:00+01:00"}).status_code == 200
        assert admin.get("/audit", params={"resource_id": "a\x00b"}).status_code == 422
        assert a.get("/jobs/x%00y").status_code == 404
        odd = _audit(admin, resource_id="x?y")
        assert [e["status"] for e in odd] == [404]  # stored as plain ASCII


@pytest.mark.parametrize(
    ("method", "template", "params", "location", "expected"),
    [
        ("GET", "/jobs/{job_id}/features", {"job_id": "j"}, None, ("download", "job", "j")),
        ("POST", "/jobs/{job_id}/cancel", {"job_id": "j"}, None, ("cancel", "job", "j")),
        ("POST", "/slides/{slide_id}/analyses", {"slide_id": "s"}, "/jobs/j2", ("create", "job", "j2")),
        ("POST", "/slides", {}, "/slides/s9", ("create", "slide", "s9")),
        ("GET", "/slides", {}, None, ("read", "slide", None)),
        ("DELETE", "/slides/{slide_id}", {"slide_id": "s"}, None, ("delete", "slide", "s")),
        ("GET", "/healthz", {}, None, None),
        ("GET", "/metrics", {}, None, None),
        ("GET", "/models", {}, None, None),
        ("POST", "/models/reload", {}, None, ("reload", "model", None)),
        # a PACS analysis was not audited at all, and these result contents were logged as plain reads
        ("POST", "/pacs/analyses", {}, "/jobs/j3", ("create", "job", "j3")),
        ("GET", "/jobs/{job_id}/fhir", {"job_id": "j"}, None, ("download", "job", "j")),
        ("GET", "/jobs/{job_id}/dicom", {"job_id": "j"}, None, ("download", "job", "j")),
        ("GET", "/jobs/{job_id}/annotations.geojson", {"job_id": "j"}, None, ("download", "job", "j")),
        ("GET", "/jobs/{job_id}/heatmap", {"job_id": "j"}, None, ("download", "job", "j")),
    ],
)
def test_audit_actions_from_route_templates(method, template, params, location, expected) -> None:
    assert audit_action(method, template, params, location) == expected


def test_json_logs_carry_ids_and_no_file_names(capsys) -> None:
    from service.obs.context import log_context

    configure_logging("info", "json")
    try:
        with log_context(request_id="r-1", job_id="j" * 32, tenant="t1"):
            logging.getLogger("mstar.test").info("job %s finished", "j" * 32)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mstar.test").exception("crashed")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    first, second = lines
    assert first["request_id"] == "r-1" and first["job_id"] == "j" * 32 and first["tenant"] == "t1"
    assert first["level"] == "info" and first["logger"] == "mstar.test" and first["ts"].endswith("Z")
    assert "request_id" not in second and second["exc_type"] == "ValueError" and "boom" in second["exc"]


def test_audit_events_the_database_refuses_are_kept_and_written_when_it_takes_writes_again(tmp_path) -> None:
    """Events the database could not take (its disk full) were dropped after one try, a read answered 200 with
    no trace left. They are now held and written, in order, once the database takes writes again."""
    import time

    from sqlalchemy import func, select, text

    from service.api.observe import AuditWriter
    from service.store.db import init_db, make_engine, session_factory, transaction
    from service.store.models import AuditEvent

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    init_db(engine)
    sessions = session_factory(engine)

    def event(i: int) -> dict:
        return {
            "tenant_id": "t",
            "key_prefix": "p",
            "action": "download",
            "resource": "job",
            "resource_id": f"j{i}",
            "method": "GET",
            "route": "/jobs/{job_id}/features",
            "status": 200,
            "client": "127.0.0.1",
            "request_id": f"r{i}",
        }

    def count() -> int:
        with transaction(sessions) as s:
            return s.scalar(select(func.count()).select_from(AuditEvent))

    writer = AuditWriter(sessions)
    try:
        with engine.begin() as conn:  # the database refuses the writes for a while
            conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
        for i in range(3):
            writer.put(event(i))
        time.sleep(1.5)  # a flush or two fail meanwhile
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
        writer.put(event(3))
        deadline = time.monotonic() + 10
        while count() < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        with transaction(sessions) as s:
            assert [e.resource_id for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))] == [
                "j0",
                "j1",
                "j2",
                "j3",
            ]
    finally:
        writer.close()
        engine.dispose()
