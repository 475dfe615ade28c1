"""The gateway over real HTTP (uvicorn on loopback): tenants, hostile uploads, jobs, cancel, webhooks, metrics.

Jobs run through the production runner with a small real pipeline (`runner_pipelines:tiny`), so these tests
do not depend on model weights; `test_api_e2e.py` runs the real `run_analysis`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from services import live_server, wait_job, webhook_receiver

from service import webhooks
from service.api import create_app
from service.config import Settings

KEY_A, KEY_B, KEY_ADMIN = "tenant-a-key-0123456789abcdef", "tenant-b-key-0123456789abcdef", "admin-key-0123456789abc"
CAP = 5 * 1024 * 1024
SECRET = "whsec-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("svc")
    settings = Settings(
        data_dir=data,
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.1,
        upload_max_bytes=CAP,
        upload_drain_bytes=8 * 1024 * 1024,
        webhook_allow_private=True,
        webhook_secret=SECRET,
        webhook_backoff_s=0.05,
        api_keys=[
            {"tenant": "a", "key": KEY_A},
            {"tenant": "b", "key": KEY_B},
            {"tenant": "ops", "key": KEY_ADMIN, "admin": True},
        ],
    )
    with live_server(create_app(settings)) as url:
        yield url, settings


def _client(url: str, key: str | None, bearer: bool = False) -> httpx.Client:
    headers = {} if key is None else ({"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key})
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def _blob_files(settings: Settings) -> list[Path]:
    root = settings.blob_dir
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_auth_is_required_and_checked(server) -> None:
    url, _ = server
    with _client(url, None) as c:
        r = c.get("/slides")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "Bearer" in r.headers["www-authenticate"]
        assert c.get("/healthz").status_code == 200
    with _client(url, "wrong-key-0123456789") as c:
        assert c.get("/jobs").status_code == 401
    with _client(url, KEY_A, bearer=True) as c:
        assert c.get("/slides").status_code == 200
        assert c.post("/models/reload").status_code == 403  # admin scope only
    with _client(url, KEY_ADMIN) as c:
        r = c.post("/models/reload")
        assert r.status_code == 200 and r.json()["bundle"] is None


def test_upload_analyse_and_fetch_results(server, cmu_svs: Path) -> None:
    url, settings = server
    with _client(url, KEY_A) as c:
        r = c.post("/slides", files={"file": ("patient-name.svs", cmu_svs.read_bytes())})
        assert r.status_code == 202, r.text
        body = r.json()
        assert r.headers["location"] == f"/jobs/{body['job']['id']}"
        slide = body["slide"]
        assert slide["format"] == "svs" and slide["info"]["mpp"]["x"] == pytest.approx(0.499)
        assert "patient-name" not in r.text  # the client's filename is never kept
        assert not any("patient-name" in p.name for p in _blob_files(settings))
        job = wait_job(c, body["job"]["id"])
        assert job["state"] == "succeeded" and job["progress"] == 1.0 and job["attempts"] == 1
        assert job["links"]["heatmap"].endswith("/heatmap.png")
        res = c.get(job["links"]["result"])
        assert res.status_code == 200 and res.json()["n_patches"] == 16
        feats = c.get(job["links"]["features"])
        assert feats.status_code == 200 and feats.content[:8] == b"\x89HDF\r\n\x1a\n"
        png = c.get(job["links"]["heatmap"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"

        # the same bytes again: the same slide, a new job; analyze=false: the slide alone (200, not 201)
        again = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}).json()
        assert again["slide"]["id"] == slide["id"] and again["job"]["id"] != job["id"]
        plain = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"})
        assert plain.status_code == 200 and plain.json()["id"] == slide["id"]
        wait_job(c, again["job"]["id"])

        # explicit analyses with an idempotency key
        opts = {"tasks": ["embedding", "zeroshot"], "prompts": ["tumour", "normal"]}
        a1 = c.post(f"/slides/{slide['id']}/analyses", json=opts, headers={"Idempotency-Key": "k-1"})
        a2 = c.post(f"/slides/{slide['id']}/analyses", json=opts, headers={"Idempotency-Key": "k-1"})
        assert a1.status_code == a2.status_code == 202 and a1.json()["id"] == a2.json()["id"]
        assert a1.headers["location"] == f"/jobs/{a1.json()['id']}"
        assert wait_job(c, a1.json()["id"])["state"] == "succeeded"
        assert c.get(f"/jobs/{a1.json()['id']}/result").json()["tasks"] == ["embedding", "zeroshot"]
        bad = c.post(f"/slides/{slide['id']}/analyses", json={"tasks": ["zeroshot"]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
        bad = c.post(f"/slides/{slide['id']}/analyses", json={"tasks": ["teleport"]})
        assert bad.status_code == 422
        huge = c.post(f"/slides/{slide['id']}/analyses", json={"prompts": ["x" * 400] * 3000})
        assert huge.status_code == 413  # JSON bodies are capped at 1 MiB before parsing
        page = c.get("/jobs", params={"slide_id": slide["id"], "limit": 2}).json()
        assert page["total"] == 3 and len(page["items"]) == 2 and page["next_offset"] == 2


def test_tenants_cannot_see_each_others_anything(server, cmu_svs: Path) -> None:
    url, _ = server
    with _client(url, KEY_A) as a, _client(url, KEY_B) as b:
        up = a.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}).json()
        sid, jid = up["slide"]["id"], up["job"]["id"]
        wait_job(a, jid)
        for path in (
            f"/slides/{sid}",
            f"/jobs/{jid}",
            f"/jobs/{jid}/result",
            f"/jobs/{jid}/features",
            f"/jobs/{jid}/heatmap.png",
        ):
            r = b.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert b.post(f"/jobs/{jid}/cancel").status_code == 404
        assert b.post(f"/slides/{sid}/analyses", json={}).status_code == 404
        assert b.delete(f"/slides/{sid}").status_code == 404
        assert all(s["id"] != sid for s in b.get("/slides").json()["items"])
        assert all(j["id"] != jid for j in b.get("/jobs").json()["items"])
        # B uploading the same bytes gets its own slide, not A's
        mine = b.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data={"analyze": "false"})
        assert mine.status_code == 201 and mine.json()["id"] != sid
        assert a.get(f"/slides/{sid}").status_code == 200  # still there for A


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("corrupt", 422, "corrupt_slide"),
        ("truncated", 422, "corrupt_slide"),
        ("oversized", 413, "slide_too_large"),
        ("wrong_type", 415, "unsupported_format"),
        ("zip", 415, "unsupported_format"),
        ("no_mpp", 422, "missing_mpp"),
        ("empty", 422, "corrupt_slide"),
        ("no_file", 422, "invalid_parameter"),
        ("not_multipart", 415, None),
        ("bad_mpp", 422, "invalid_parameter"),
        ("bad_analyze", 422, "invalid_parameter"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing_behind(server, case, status, code, cmu_svs, tcga_j2k_svs):
    url, settings = server
    cmu = cmu_svs.read_bytes()
    files = {
        "corrupt": b"II*\x00" + os.urandom(200_000),
        "truncated": cmu[: len(cmu) // 2],
        "oversized": b"II*\x00" + b"\0" * (CAP + 1024),
        "wrong_type": b"%PDF-1.4 not a slide\n" * 100,
        "zip": b"PK\x03\x04" + os.urandom(1000),
        "no_mpp": tcga_j2k_svs.read_bytes(),
        "empty": b"",
    }
    before = _blob_files(settings)
    with _client(url, KEY_A) as c:
        jobs_before = c.get("/jobs").json()["total"]
        if case == "no_file":
            r = c.post("/slides", files={"other": ("x", b"abc")})
        elif case == "not_multipart":
            r = c.post("/slides", json={"file": "abc"})
        elif case in ("bad_mpp", "bad_analyze"):
            field = {"bad_mpp": {"mpp_override": "72"}, "bad_analyze": {"analyze": "maybe"}}[case]
            r = c.post("/slides", files={"file": ("x.svs", cmu)}, data=field)
        else:
            r = c.post("/slides", files={"file": ("x.svs", files[case])})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert code is None or err["code"] == code
        assert err["message"] and str(settings.data_dir) not in err["message"]  # no server paths
        assert ".part" not in err["message"] and "/tmp" not in err["message"]
        assert _blob_files(settings) == before  # nothing stored, nothing half-written
        assert c.get("/jobs").json()["total"] == jobs_before
        assert c.get("/healthz").status_code == 200  # the server survives
        if case == "no_mpp":  # with the scanner's µm/px given, the same file is accepted
            ok = c.post(
                "/slides", files={"file": ("x.svs", files[case])}, data={"mpp_override": "0.5", "analyze": "false"}
            )
            assert ok.status_code == 201 and ok.json()["info"]["mpp"]["source"] == "override"


def test_cancel_delete_and_listing(server, cmu_svs: Path) -> None:
    url, settings = server
    with _client(url, KEY_B) as c:
        sid = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        jobs = [c.post(f"/slides/{sid}/analyses", json={}).json()["id"] for _ in range(3)]
        r = c.post(f"/jobs/{jobs[-1]}/cancel")  # the last one is still queued behind the others
        assert r.status_code == 202 and r.json()["state"] in ("canceled", "running")
        final = [wait_job(c, j) for j in jobs]
        assert final[-1]["state"] == "canceled" or final[-1]["state"] == "succeeded"
        if final[-1]["state"] == "canceled":
            res = c.get(f"/jobs/{jobs[-1]}/result")
            assert res.status_code == 409 and res.json()["error"]["code"] == "not_ready"
        assert c.post(f"/jobs/{jobs[0]}/cancel").status_code == 409  # already finished
        listing = c.get("/slides", params={"limit": 1}).json()
        assert listing["total"] >= 1 and len(listing["items"]) == 1
        assert c.get("/slides", params={"limit": 0}).status_code == 422
        assert c.delete(f"/slides/{sid}").status_code == 204
        assert c.get(f"/slides/{sid}").status_code == 404
        for j in jobs:
            assert c.get(f"/jobs/{j}").status_code == 404
    assert not any(sid in p.name for p in _blob_files(settings))
    assert not any(j in str(p) for p in _blob_files(settings) for j in jobs)


def test_signed_webhook_is_delivered(server, cmu_svs: Path) -> None:
    url, _ = server
    # the first attempt is answered 500: delivery retries
    with webhook_receiver(statuses=(500,)) as (hook_url, received), _client(url, KEY_A) as c:
        sid = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        bad = c.post(f"/slides/{sid}/analyses", json={"webhook_url": "ftp://example.org/x"})
        assert bad.status_code == 422
        job = c.post(f"/slides/{sid}/analyses", json={"webhook_url": hook_url}).json()
        wait_job(c, job["id"])
        deadline = time.monotonic() + 20
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(received) == 2
    headers, body = received[-1]
    assert webhooks.verify(SECRET, headers[webhooks.TIMESTAMP_HEADER], body, headers[webhooks.SIGNATURE_HEADER])
    assert not webhooks.verify("other", headers[webhooks.TIMESTAMP_HEADER], body, headers[webhooks.SIGNATURE_HEADER])
    payload = json.loads(body)
    assert payload["job_id"] == job["id"] and payload["state"] == "succeeded" and headers["X-Mstar-Attempt"] == "2"
    event_ids = {h[webhooks.EVENT_ID_HEADER] for h, _ in received}
    assert event_ids == {f"{job['id']}.succeeded"}  # one event, retried: receivers dedupe on it
    assert job["webhook"] == {"state": "waiting", "delivered": None, "sent_at": None}
    with _client(url, KEY_A) as c:  # the sender records the outcome just after the 2xx
        deadline = time.monotonic() + 10
        while (status := c.get(f"/jobs/{job['id']}").json()["webhook"])["state"] != "done":
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert "url" not in status and "127.0.0.1" not in json.dumps(status)
        assert status["state"] == "done" and status["delivered"] is True and status["sent_at"].endswith("Z")


def test_readiness_models_and_metrics(server) -> None:
    url, _ = server
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["store"]["ok"] and checks["runner"]["ok"] and checks["runner"]["kind"] == "embedded"
    with _client(url, KEY_A) as c:
        models = c.get("/models").json()
        assert models["bundle"] is None and "MSTAR_BUNDLE_DIR" in models["detail"]
        c.get("/jobs/does-not-exist")
    assert httpx.get(f"{url}/metrics").status_code == 401  # not public unless the deployment says so
    assert httpx.get(f"{url}/metrics", headers={"X-API-Key": KEY_A}).status_code == 403  # counts of all tenants
    text = httpx.get(f"{url}/metrics", headers={"X-API-Key": KEY_ADMIN}).text
    assert 'route="/jobs/{job_id}"' in text and "does-not-exist" not in text
    assert "mstar_queue_depth" in text and 'mstar_jobs{state="succeeded"}' in text
    assert "mstar_upload_bytes_total" in text and 'mstar_job_stage_duration_seconds_count{stage="embed"}' in text
    assert "mstar_patches_per_second_count" in text


def test_probe_runs_outside_the_api_process(server, cmu_svs: Path, monkeypatch) -> None:
    """A reader that hangs or dies takes only the check process with it."""
    import asyncio

    from service.api.upload import probe_slide
    from service.errors import CorruptSlideError, SlideError

    _, settings = server
    info = asyncio.run(probe_slide(cmu_svs, None, settings))
    assert info["format"] == "svs"
    tight = settings.model_copy(update={"validate_timeout_s": 0.01})
    with pytest.raises(CorruptSlideError, match="within"):
        asyncio.run(probe_slide(cmu_svs, None, tight))
    capped = settings.model_copy(update={"validate_memory_mb": 64})  # too little to load the decoders at all
    with pytest.raises(SlideError) as err:
        asyncio.run(probe_slide(cmu_svs, None, capped))
    assert err.value.code in ("corrupt_slide", "slide_too_large")


def test_idempotency_key_reused_with_another_request_is_refused(server, cmu_svs: Path, tmp_path: Path) -> None:
    """The same key with the same request returns the first job; with another slide, other options or another
    webhook it is refused (422) and nothing new is queued."""
    url, _ = server
    with _client(url, KEY_A) as c:
        x = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        other = cmu_svs.read_bytes() + b"\0"  # another slide (other bytes), same pixels
        y = c.post("/slides", files={"file": ("y", other)}, data={"analyze": "false"}).json()["id"]
        key = {"Idempotency-Key": f"idem-{os.urandom(6).hex()}"}
        first = c.post(f"/slides/{x}/analyses", json={"tasks": ["embedding"]}, headers=key)
        assert first.status_code == 202
        again = c.post(f"/slides/{x}/analyses", json={"tasks": ["embedding"]}, headers=key)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        total = c.get("/jobs").json()["total"]
        for path, body in (
            (f"/slides/{y}/analyses", {"tasks": ["embedding"]}),
            (f"/slides/{x}/analyses", {"tasks": ["embedding", "classification"]}),
            (f"/slides/{x}/analyses", {"tasks": ["embedding"], "fresh": True}),
        ):
            r = c.post(path, json=body, headers=key)
            assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
        assert c.get("/jobs").json()["total"] == total
        wait_job(c, first.json()["id"])


def test_private_webhook_urls_are_refused_at_submit(tmp_path: Path, cmu_svs: Path) -> None:
    """Without MSTAR_WEBHOOK_ALLOW_PRIVATE, a loopback or private webhook is a 422 when the job is asked for, not
    a silent failure at delivery time."""
    settings = Settings(data_dir=tmp_path, pipeline="runner_pipelines:tiny", api_keys=[{"tenant": "a", "key": KEY_A}])
    with live_server(create_app(settings)) as url, _client(url, KEY_A) as c:
        sid = c.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        for hook in (
            "http://127.0.0.1:9/h",
            "http://10.1.2.3/h",
            "http://169.254.169.254/latest",
            "http://100.64.0.1/h",
        ):
            r = c.post(f"/slides/{sid}/analyses", json={"webhook_url": hook})
            assert r.status_code == 422 and "internal network" in r.json()["error"]["message"], r.text
        assert c.get("/jobs").json()["total"] == 0


def test_queued_quota_and_result_reuse(tmp_path: Path, cmu_svs: Path) -> None:
    """A tenant past its queued quota gets 429 while another tenant is served; an identical analysis reuses the
    finished result (a new job, same files) unless `fresh` asks for a new run."""
    settings = Settings(
        data_dir=tmp_path,
        pipeline="runner_pipelines:slow",
        runner_workers=1,
        runner_poll_s=0.1,
        tenant_max_queued=2,
        api_keys=[{"tenant": "a", "key": KEY_A}, {"tenant": "b", "key": KEY_B}],
    )
    with live_server(create_app(settings)) as url, _client(url, KEY_A) as a, _client(url, KEY_B) as b:
        sid = a.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        ids = [a.post(f"/slides/{sid}/analyses", json={"fresh": True}).json()["id"]]
        deadline = time.monotonic() + 30
        while a.get(f"/jobs/{ids[0]}").json()["state"] != "running":  # claimed first: a third post must not race it
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ids += [a.post(f"/slides/{sid}/analyses", json={"fresh": True}).json()["id"] for _ in range(2)]  # two wait
        r = a.post(f"/slides/{sid}/analyses", json={"fresh": True})
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
        bid = b.post("/slides", files={"file": ("x", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        assert b.post(f"/slides/{bid}/analyses", json={"fresh": True}).status_code == 202  # another tenant
        for j in ids:
            a.post(f"/jobs/{j}/cancel")
        for j in ids:
            wait_job(a, j)


def test_identical_analyses_reuse_the_finished_result(server, cmu_svs: Path) -> None:
    url, _ = server
    with _client(url, KEY_B) as c:
        sid = c.post("/slides", files={"file": ("r", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        body = {"tasks": ["embedding", "survival"]}
        first = wait_job(c, c.post(f"/slides/{sid}/analyses", json=body).json()["id"])
        assert first["state"] == "succeeded" and "reused_from" not in first["options"]
        again = c.post(f"/slides/{sid}/analyses", json=body)
        assert again.status_code == 202
        reused = again.json()
        assert reused["state"] == "succeeded" and reused["options"]["reused_from"] == first["id"]
        assert reused["id"] != first["id"] and reused["attempts"] == 0
        a, b = c.get(f"/jobs/{first['id']}/result"), c.get(f"/jobs/{reused['id']}/result")
        assert a.status_code == b.status_code == 200 and a.content == b.content
        assert a.headers["X-Content-SHA256"] == b.headers["X-Content-SHA256"]
        fresh = wait_job(c, c.post(f"/slides/{sid}/analyses", json={**body, "fresh": True}).json()["id"])
        assert fresh["state"] == "succeeded" and fresh["attempts"] == 1 and "reused_from" not in fresh["options"]
        other = wait_job(c, c.post(f"/slides/{sid}/analyses", json={"tasks": ["embedding"]}).json()["id"])
        assert "reused_from" not in other["options"]  # other options: computed anew


def test_a_refused_bundle_refuses_analyses_at_submit(tmp_path: Path, cmu_svs: Path) -> None:
    """With its bundle refused (/readyz unavailable) the gateway still took analyses (202) and failed each one with
    invalid_bundle, and an RNA request was told the bundle has no slide + RNA head. Each is now a 503 naming the
    refusal, before anything is stored; a slide stored without analysis is still taken."""
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "bundle.json").write_text("{not json")
    settings = Settings(
        data_dir=tmp_path / "data",
        bundle_dir=bad,
        pipeline="runner_pipelines:tiny",
        api_keys=[{"tenant": "a", "key": KEY_A}],
    )
    with live_server(create_app(settings)) as url, _client(url, KEY_A) as c:
        r = c.post("/slides", files={"file": ("x.svs", cmu_svs.read_bytes())})
        assert r.status_code == 503 and r.json()["error"]["code"] == "bundle_unavailable", r.text
        assert "not readable JSON" in r.json()["error"]["message"] and c.get("/slides").json()["total"] == 0
        sid = c.post("/slides", files={"file": ("x.svs", cmu_svs.read_bytes())}, data={"analyze": "false"}).json()["id"]
        for body in ({}, {"rna": {"genes": ["TP53"], "values": [1.0]}}):
            r = c.post(f"/slides/{sid}/analyses", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "bundle_unavailable", r.text
        assert c.get("/jobs").json()["total"] == 0
