"""Ingest over real HTTP (uvicorn on loopback, the embedded runner, the real probe process and real slides):
the defects of issue 13 on the ingest side, each pinned by a test that failed before `service/ingest/`.

Stalled and concurrent uploads (defect 2), an Idempotency-Key reused with another request (3), a full disk
(5, on a real tmpfs), the JSON body over 1 MiB, the unterminated multipart body and the re-upload with another
µm/px (6).
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from services import live_server, postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)

from service.api import create_app
from service.config import Settings

KEY_A, KEY_B = "ingest-a-key-0123456789abcdef", "ingest-b-key-0123456789abcdef"
KEYS = [{"tenant": "a", "key": KEY_A}, {"tenant": "b", "key": KEY_B}] + [
    {"tenant": f"t{i}", "key": f"ingest-t{i}-key-0123456789abcdef"} for i in range(4)
]


def _settings(data: Path, **kw) -> Settings:
    return Settings(
        data_dir=data, pipeline="runner_pipelines:tiny", runner_workers=1, runner_poll_s=0.1, api_keys=KEYS, **kw
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = _settings(tmp_path_factory.mktemp("ingest"))
    with live_server(create_app(settings)) as url:
        yield url, settings


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120)


def _blobs(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.blob_dir.rglob("*") if p.is_file())


def _staging(settings: Settings) -> list[Path]:
    return sorted(p for p in (settings.blob_dir / ".staging").rglob("*"))


# --- defect 6: the JSON 413, the unterminated multipart body, the re-upload with another µm/px -----------------


def test_json_body_over_1mib_gets_the_documented_error_body(server) -> None:
    url, _ = server
    big = b'{"tasks": ["' + b"x" * (2 << 20) + b'"]}'
    with _client(url, KEY_A) as c:
        for content in (big, iter([big[: 1 << 20], big[1 << 20 :]])):  # with Content-Length, and chunked
            r = c.post(f"/slides/{'0' * 32}/analyses", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and "1048576 bytes" in err["message"]
        assert c.get("/slides").status_code == 200


def test_multipart_body_without_closing_boundary_is_refused(server, cmu_svs: Path) -> None:
    url, settings = server
    head = (
        b'--xyz\r\nContent-Disposition: form-data; name="analyze"\r\n\r\nfalse\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.svs"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    before = _blobs(settings)
    with _client(url, KEY_A) as c:
        listed = c.get("/slides").json()["total"]
        for body in (head + cmu_svs.read_bytes(), head + cmu_svs.read_bytes() + b"\r\n--xyz"):
            r = c.post("/slides", content=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_request" and "closing boundary" in r.json()["error"]["message"]
        assert c.get("/slides").json()["total"] == listed
    assert _blobs(settings) == before and _staging(settings) == []


def test_misspelt_form_fields_and_a_long_boundary_are_refused_not_ignored(server, cmu_svs: Path) -> None:
    """An unknown form field (`mpp` for `mpp_override`, `analyse` for `analyze`) was dropped without a word, so
    the slide was analysed at its own µm/px, or analysed when the client meant it not to be: now 422 naming it,
    nothing stored. A multipart boundary over 256 characters was a 500 (the parser refused it outside the
    error handling): now 400."""
    url, settings = server
    before = _blobs(settings)
    with _client(url, KEY_A) as c:
        listed = c.get("/slides").json()["total"]
        for field in ("mpp", "analyse"):
            r = c.post("/slides", files={"file": ("a.svs", cmu_svs.read_bytes())}, data={field: "0.25"})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_parameter" and f"unknown form field '{field}'" in err["message"]
        b = "b" * 300
        body = f'--{b}\r\nContent-Disposition: form-data; name="analyze"\r\n\r\nfalse\r\n--{b}--\r\n'.encode()
        r = c.post("/slides", content=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
        assert "boundary" in r.json()["error"]["message"]
        assert c.get("/slides").json()["total"] == listed
    assert _blobs(settings) == before and _staging(settings) == []


def test_reupload_with_another_mpp_is_never_silently_ignored(server, tmp_path: Path, shared_data: Path) -> None:
    url, _ = server
    tile = (shared_data / "tiles" / "kather1.tif").read_bytes()  # a tile: needs mpp_override
    with _client(url, KEY_B) as c:
        first = c.post("/slides", files={"file": ("t.tif", tile)}, data={"mpp_override": "0.5", "analyze": "false"})
        assert first.status_code == 201, first.text
        sid = first.json()["id"]
        same = c.post("/slides", files={"file": ("t.tif", tile)}, data={"mpp_override": "0.5", "analyze": "false"})
        assert same.status_code == 200 and same.json()["id"] == sid
        other = c.post("/slides", files={"file": ("t.tif", tile)}, data={"mpp_override": "0.25", "analyze": "false"})
        assert other.status_code == 409, other.text
        err = other.json()["error"]
        assert err["code"] == "slide_conflict" and "mpp_override=0.5" in err["message"] and "0.25" in err["message"]
        assert c.get(f"/slides/{sid}").json()["mpp_override"] == 0.5  # the stored value, said out loud
        queued = c.post("/slides", files={"file": ("t.tif", tile)}, data={"mpp_override": "0.25"})
        assert queued.status_code == 202, queued.text
        job = queued.json()["job"]
        assert queued.json()["slide"]["id"] == sid and job["options"]["mpp_override"] == 0.25  # the job uses it


# --- defect 3: an Idempotency-Key reused with a different request -------------------------------------------------


def test_idempotency_key_reused_with_another_upload_is_422_and_stores_nothing(server, cmu_svs: Path) -> None:
    url, settings = server
    cmu = cmu_svs.read_bytes()
    with _client(url, KEY_A) as c:
        first = c.post("/slides", files={"file": ("a.svs", cmu)}, headers={"Idempotency-Key": "up-1"})
        assert first.status_code == 202, first.text
        again = c.post("/slides", files={"file": ("a.svs", cmu)}, headers={"Idempotency-Key": "up-1"})
        assert again.status_code == 202 and again.json()["job"]["id"] == first.json()["job"]["id"]
        slides, jobs, blobs = c.get("/slides").json()["total"], c.get("/jobs").json()["total"], _blobs(settings)
        for files, data in (
            ({"file": ("b.svs", cmu + b"other bytes")}, {}),  # another file
            ({"file": ("a.svs", cmu)}, {"mpp_override": "0.25"}),  # the same file, other fields
            ({"file": ("a.svs", cmu)}, {"analyze": "false"}),
        ):
            r = c.post("/slides", files=files, data=data, headers={"Idempotency-Key": "up-1"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "idempotency_key_reused"
        assert c.get("/slides").json()["total"] == slides and c.get("/jobs").json()["total"] == jobs
        assert [p for p in _blobs(settings) if "results" not in p.parts] == [
            p for p in blobs if "results" not in p.parts
        ]

        # the analyses route: the same key for another slide is refused, not answered with the first slide's job
        other = c.post("/slides", files={"file": ("b.svs", cmu + b"x")}, data={"analyze": "false"}).json()["id"]
        sid = first.json()["slide"]["id"]
        j1 = c.post(f"/slides/{sid}/analyses", json={}, headers={"Idempotency-Key": "an-1"})
        assert j1.status_code == 202
        assert (
            c.post(f"/slides/{sid}/analyses", json={}, headers={"Idempotency-Key": "an-1"}).json()["id"]
            == (j1.json()["id"])
        )
        r = c.post(f"/slides/{other}/analyses", json={}, headers={"Idempotency-Key": "an-1"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text


def test_idempotency_key_of_an_upload_that_queued_no_job_is_kept(server, cmu_svs: Path) -> None:
    """`analyze=false` with an Idempotency-Key: the key was kept nowhere (only jobs keep keys), so reusing it with
    another file stored that file too (201, 201). Now the repeat answers the same slide (200) and another
    request under the key is 422, with or without an analysis, and stores nothing."""
    url, settings = server
    cmu = cmu_svs.read_bytes()
    with _client(url, KEY_B) as c:
        key = {"Idempotency-Key": "store-1"}
        first = c.post("/slides", files={"file": ("a.svs", cmu + b"k1")}, data={"analyze": "false"}, headers=key)
        assert first.status_code == 201, first.text
        again = c.post("/slides", files={"file": ("a.svs", cmu + b"k1")}, data={"analyze": "false"}, headers=key)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        slides, jobs, blobs = c.get("/slides").json()["total"], c.get("/jobs").json()["total"], _blobs(settings)
        for tail, analyze in ((b"k2", "false"), (b"k2", "true"), (b"k1", "true")):
            r = c.post("/slides", files={"file": ("a.svs", cmu + tail)}, data={"analyze": analyze}, headers=key)
            assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
        assert c.get("/slides").json()["total"] == slides and c.get("/jobs").json()["total"] == jobs
        assert _blobs(settings) == blobs


@pytest.mark.parametrize("analyze", ["false", "true"])
def test_concurrent_uploads_with_one_key_and_two_files_keep_one(server, cmu_svs: Path, analyze: str) -> None:
    """Two uploads at once under one Idempotency-Key with different files: one is accepted, the other 422, and
    only the accepted one's slide stays. Both passed the key check before either had recorded the key, so the
    refused request's slide was stored anyway."""
    from concurrent.futures import ThreadPoolExecutor

    url, settings = server
    cmu = cmu_svs.read_bytes()

    def send(tail: bytes) -> httpx.Response:
        with _client(url, KEY_B) as c:
            files = {"file": ("a.svs", cmu + tail + analyze.encode())}
            return c.post(
                "/slides", files=files, data={"analyze": analyze}, headers={"Idempotency-Key": f"race-{analyze}"}
            )

    with _client(url, KEY_B) as c:
        slides = c.get("/slides").json()["total"]
    stored = [p for p in _blobs(settings) if "results" not in p.parts]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, [b"race-1", b"race-2"]))
    codes = sorted(r.status_code for r in answers)
    assert codes == sorted([201 if analyze == "false" else 202, 422]), [r.text for r in answers]
    with _client(url, KEY_B) as c:
        assert c.get("/slides").json()["total"] == slides + 1
    assert len([p for p in _blobs(settings) if "results" not in p.parts]) == len(stored) + 1


# --- defect 2: stalled and concurrent uploads ---------------------------------------------------------------------


def _stalled_upload(url: str, key: str, out: list, i: int) -> None:
    """Headers and a few bytes of a multipart body that claims 10 MB, then silence; records the answer."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            b"POST /slides HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.svs"\r\n\r\nII*\x00'
        )
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(v)
                    for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                    if k.lower() == b"content-length"
                ),
                0,
            )
            while len(body) < length:  # the answer's body may arrive after its headers
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            data = head + b"\r\n\r\n" + body
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    out[i] = (status, data, time.monotonic() - t0)


@pytest.mark.parametrize(("db", "stalled"), [("sqlite", 15), ("postgresql", 31)])  # more than each pool holds
def test_stalled_uploads_are_bounded_and_timed_out_while_other_tenants_are_served(
    tmp_path: Path, request, db: str, stalled: int
) -> None:
    kw = {"database_url": request.getfixturevalue("postgres_url")} if db == "postgresql" else {}
    settings = _settings(tmp_path / "d", upload_idle_timeout_s=3.0, tenant_max_uploads=4, max_uploads=32, **kw)
    with live_server(create_app(settings)) as url, _client(url, KEY_B) as b:
        got: list = [None] * stalled
        threads = [threading.Thread(target=_stalled_upload, args=(url, KEY_A, got, i)) for i in range(stalled)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(10):  # another tenant's reads go on, quickly, while the stalled uploads sit there
            t0 = time.monotonic()
            r = b.get("/slides")
            assert r.status_code == 200 and time.monotonic() - t0 < 2.0, (r.status_code, time.monotonic() - t0)
            assert b.get("/readyz").status_code == 200
            time.sleep(0.2)
        for t in threads:
            t.join(30)
        statuses = sorted(g[0] for g in got)
        assert statuses == [400] * 4 + [429] * (stalled - 4), got  # 4 uploads per tenant, dropped after 3 s silent
        for status, raw, secs in got:
            if status == 429:
                assert b"quota_exceeded" in raw and b"retry-after: 5" in raw.lower() and secs < 2.5
            else:
                assert b"sent nothing for 3 s" in raw and 2.5 < secs < 10
        assert _staging(settings) == [] and _blobs(settings) == []  # the staging files went with them


def _uploads_answered(url: str) -> float:
    """How many `POST /slides` requests the server has ended, whatever their status (from its /metrics)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.findall(r"^mstar_http_request_duration_seconds_count\{([^}]*)\} (\S+)$", text, re.M)
    return sum(float(v) for labels, v in found if 'method="POST"' in labels and 'route="/slides"' in labels)


def test_client_gone_mid_upload_leaves_no_staging_file_and_frees_its_slot(tmp_path: Path, cmu_svs: Path) -> None:
    settings = _settings(tmp_path / "d", metrics_public=True)
    with live_server(create_app(settings)) as url:
        _client_gone_six_times(url, settings, cmu_svs)


def _client_gone_six_times(url: str, settings: Settings, cmu_svs: Path) -> None:
    host, port = url.removeprefix("http://").split(":")
    before = _uploads_answered(url)
    for _ in range(6):  # more than the tenant's 4 slots: each one must come back when its client vanishes
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /slides HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY_A.encode() + b"\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.svs"\r\n\r\n'
                + cmu_svs.read_bytes()[: 3 << 20]
            )
    # The server may not have begun the last requests yet when the client is gone: wait until it has ended all
    # six (its request counter), not merely until staging looks empty, which it also is before they begin.
    deadline = time.monotonic() + 30
    while _uploads_answered(url) < before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _uploads_answered(url) == before + 6
    assert _staging(settings) == []
    with _client(url, KEY_A) as c:
        ok = c.post("/slides", files={"file": ("c.svs", cmu_svs.read_bytes())}, data={"analyze": "false"})
        assert ok.status_code in (200, 201), ok.text


def test_twenty_concurrent_uploads_succeed_or_get_a_clean_429_or_503(tmp_path: Path, cmu_svs: Path) -> None:
    settings = _settings(tmp_path / "d", tenant_max_uploads=4, max_uploads=8)
    cmu = cmu_svs.read_bytes()
    keys = [k["key"] for k in KEYS[2:]]  # four tenants, five uploads each
    with live_server(create_app(settings)) as url:
        answers: list = [None] * 20

        def upload(i: int) -> None:
            with _client(url, keys[i % 4]) as c:
                r = c.post("/slides", files={"file": ("c.svs", cmu + bytes([i]))}, data={"analyze": "false"})
                answers[i] = (r.status_code, r.json(), r.headers.get("retry-after"))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    codes = [a[0] for a in answers]
    assert set(codes) <= {201, 429, 503} and codes.count(201) >= 8, answers
    for status, body, retry in answers:
        if status != 201:
            assert body["error"]["code"] == {429: "quota_exceeded", 503: "busy"}[status] and retry == "5"
    assert _staging(settings) == []


# --- defect 5: a full disk ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small real filesystem (tmpfs) mounted at `path`: needs root and mount rights, else the test skips."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _series_zip(dicom_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(dicom_dir.iterdir()):
            zf.write(f, arcname=f.name)
    return buf.getvalue()


def test_full_disk_is_507_storage_full_and_loses_nothing(tmp_path, shared_data, cmu_svs, tcga_j2k_svs, dicom_dir):
    settings = _settings(tmp_path / "d")
    with tmpfs(settings.blob_dir, "2600k"), live_server(create_app(settings)) as url, _client(url, KEY_A) as c:
        tile = (shared_data / "tiles" / "kather1.tif").read_bytes()
        kept = c.post("/slides", files={"file": ("t.tif", tile)}, data={"mpp_override": "0.5", "analyze": "false"})
        assert kept.status_code == 201, kept.text
        stored = _blobs(settings)
        # the ZIP of a DICOM series fits, unpacking it does not; then a slide that does not fit at all
        for name, body in (("s.zip", _series_zip(dicom_dir)), ("big.svs", tcga_j2k_svs.read_bytes())):
            r = c.post("/slides", files={"file": (name, body)}, data={"analyze": "false"})
            assert r.status_code == 507, r.text
            err = r.json()["error"]
            assert err["code"] == "storage_full" and "no space left" in err["message"]
            assert _staging(settings) == [] and _blobs(settings) == stored  # cleaned up, nothing touched
        assert c.get(f"/slides/{kept.json()['id']}").status_code == 200
        assert c.get("/slides").json()["total"] == 1
        ok = c.post("/slides", files={"file": ("c.svs", cmu_svs.read_bytes())}, data={"analyze": "false"})
        assert ok.status_code == 201, ok.text  # space is there again once the failed upload is gone


def test_batch_into_a_full_store_fails_the_line_with_storage_full(tmp_path, cmu_svs, tcga_j2k_svs) -> None:
    from service.batch import BatchService

    (tmp_path / "c.svs").write_bytes(cmu_svs.read_bytes())
    (tmp_path / "t.svs").write_bytes(tcga_j2k_svs.read_bytes())
    (tmp_path / "m.csv").write_text("slide,mpp\nt.svs,0.5\nc.svs,\n")
    settings = _settings(tmp_path / "d")
    with tmpfs(settings.blob_dir, "2600k"):
        svc = BatchService(settings)
        try:
            rep = svc.submit(tmp_path / "m.csv", tenant="lab")
            items = {it.name: it for it in svc.status(rep.batch_id).items}
            assert items["t.svs"].error_code == "storage_full" and "no space left" in items["t.svs"].reason
            assert items["c.svs"].state == "queued" and items["c.svs"].slide_id  # the batch goes on
            assert _staging(settings) == []
        finally:
            svc.close()


# --- one ingest path: batch lines are checked like uploads and say the same codes ---------------------------------


def test_batch_lines_take_the_upload_path_same_check_same_codes(tmp_path: Path, cmu_svs: Path, tcga_j2k_svs) -> None:
    from service.batch import BatchService

    cap = 4_000_000
    cmu = cmu_svs.read_bytes()
    (tmp_path / "ok.svs").write_bytes(cmu)
    (tmp_path / "half.svs").write_bytes(cmu[: len(cmu) // 2])
    (tmp_path / "nompp.svs").write_bytes(tcga_j2k_svs.read_bytes())  # sniffs as SVS; only opening it tells
    (tmp_path / "big.svs").write_bytes(cmu + b"\0" * (cap + 1 - len(cmu)))
    (tmp_path / "m.csv").write_text("slide\nok.svs\nhalf.svs\nnompp.svs\nbig.svs\n")
    settings = _settings(tmp_path / "d", upload_max_bytes=cap)
    svc = BatchService(settings)
    try:
        rep = svc.submit(tmp_path / "m.csv", tenant="lab")
        items = {it.name: it for it in svc.status(rep.batch_id).items}
        assert items["ok.svs"].state == "queued" and len(rep.queued) == 1
        assert items["half.svs"].error_code == "corrupt_slide"
        assert items["nompp.svs"].error_code == "missing_mpp"  # refused at submit by the check, as an upload is
        assert items["big.svs"].error_code == "slide_too_large"  # the one "too large" (413 over HTTP)
        assert _staging(settings) == []
    finally:
        svc.close()


def test_batch_http_lines_are_fetched_checked_and_capped(tmp_path: Path, cmu_svs: Path) -> None:
    """http(s) manifest lines from a real HTTP server on loopback: copied, checked, deduplicated; a missing URL is
    `slide_not_found` and one over the cap `slide_too_large`, as for every other source."""
    import functools
    import http.server

    from service.batch import BatchService

    site = tmp_path / "site"
    site.mkdir()
    (site / "a.svs").write_bytes(cmu_svs.read_bytes())
    (site / "big.svs").write_bytes(cmu_svs.read_bytes() + b"\0" * 4096)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    (tmp_path / "local.svs").write_bytes(cmu_svs.read_bytes())
    (tmp_path / "m.csv").write_text(f"slide\n{base}/a.svs\n{base}/gone.svs\n{base}/big.svs\nlocal.svs\n")
    settings = _settings(tmp_path / "d", upload_max_bytes=cmu_svs.stat().st_size + 100)
    svc = BatchService(settings)
    try:
        rep = svc.submit(tmp_path / "m.csv", tenant="lab")
        items = {it.name: it for it in svc.status(rep.batch_id).items}
        assert items["a.svs"].state == "queued" and items["a.svs"].slide_id == items["local.svs"].slide_id
        assert items["gone.svs"].error_code == "slide_not_found" and "404" in items["gone.svs"].reason
        assert items["big.svs"].error_code == "slide_too_large"
        assert _staging(settings) == []
    finally:
        svc.close()
        httpd.shutdown()
        httpd.server_close()
