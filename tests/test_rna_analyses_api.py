"""`POST /slides/{id}/analyses` with an RNA-Seq profile, end to end on the embedded runner: real uvicorn, the
real CMU slide, a tiny bundle with a slide + RNA head (`rna_fixtures`). The profile reaches the job only through
`service.jobs.rna_channel`; these tests check the fused result, that the profile is gone once the job ends and
is nowhere in the database, the job view, the result or the gateway's log, how reuse treats RNA, and the 422s."""

from __future__ import annotations

import functools
import logging
import sqlite3
from pathlib import Path

import httpx
import pytest
from rna_fixtures import build_fusion_bundle, fusion_genes
from services import live_server, wait_job

from service.api import create_app
from service.config import Settings

KEY = "rna-tenant-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}"}
STORE_ONLY = {"analyze": "false"}
# values no other field of a job or result would hold: if one shows up anywhere, the profile leaked
MARKERS = [7.13579246 + 0.01 * i for i in range(20)]


@pytest.fixture(scope="module")
def fusion_bundle(tmp_path_factory) -> Path:
    return build_fusion_bundle(tmp_path_factory.getbasetemp())


def _settings(tmp: Path, bundle: Path) -> Settings:
    return Settings(
        data_dir=tmp, bundle_dir=bundle, runner_workers=1, runner_poll_s=0.2, api_keys=[{"tenant": "t", "key": KEY}]
    )


_wait = functools.partial(wait_job, timeout=300)  # a job through the whole stack


def _held(settings: Settings) -> list[Path]:
    folder = settings.blob_dir / "ephemeral" / "rna"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def test_fused_risk_over_http_and_the_profile_leaves_no_trace(tmp_path, fusion_bundle, cmu_svs, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, fusion_bundle)
    genes = fusion_genes(fusion_bundle)
    # one model gene left out (imputed), one gene the model does not know
    rna = {"genes": [*genes[1:], "NOTAMODELGENE"], "values": [*MARKERS[1:], MARKERS[0]]}
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        r = c.post("/slides", files={"file": ("CMU-1-Small-Region.svs", cmu_svs.read_bytes())}, data=STORE_ONLY)
        assert r.status_code == 201, r.text
        slide = r.json()["id"]
        r = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": rna})
        assert r.status_code == 202, r.text
        assert r.json()["options"]["rna_profile"] == "given (not stored)" and "rna_sha256" not in r.json()["options"]
        job = _wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        result = c.get(f"/jobs/{job['id']}/result").json()
        mm = result["multimodal"]
        assert (mm["genes_used"], mm["genes_missing"], mm["genes_unknown"]) == (len(genes) - 1, 1, 1)
        assert set(mm["contributions"]) == {"wsi", "rna"} and isinstance(mm["risk"], float)
        assert set(mm["slide_only_risk"]) == set(result["survival"])  # the slide-only risk beside the fused one
        assert _held(settings) == []  # removed when the job ended

        # the same profile in another gene order (and as ints where exact) is the same work: reused
        order = list(range(len(rna["genes"])))[::-1]
        same = {"genes": [rna["genes"][i] for i in order], "values": [rna["values"][i] for i in order]}
        again = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": same}).json()
        assert again["state"] == "succeeded" and again["options"].get("reused_from") == job["id"]
        # the same profile as a file (multipart part `rna`, TSV, with a header) is the same work too
        tsv = "gene\tvalue\n" + "".join(f"{g}\t{v!r}\n" for g, v in zip(rna["genes"], rna["values"], strict=True))
        r = c.post(
            f"/slides/{slide}/analyses",
            files={"rna": ("profile.tsv", tsv.encode())},
            data={"request": '{"tasks": ["survival"]}'},
        )
        assert r.status_code == 202 and r.json()["options"].get("reused_from") in (job["id"], again["id"]), r.text
        # one value changed: new work, never merged with the first
        other = {"genes": rna["genes"], "values": [rna["values"][0] + 1.5, *rna["values"][1:]]}
        r2 = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": other}).json()
        assert "reused_from" not in r2["options"] and r2["id"] != job["id"]
        # and the slide alone is a third analysis, with no multimodal block
        r3 = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"]}).json()
        job2, job3 = _wait(c, r2["id"]), _wait(c, r3["id"])
        assert job2["state"] == job3["state"] == "succeeded"
        res2 = c.get(f"/jobs/{job2['id']}/result").json()
        assert res2["multimodal"]["risk"] != mm["risk"]
        assert "multimodal" not in c.get(f"/jobs/{job3['id']}/result").json()
        assert _held(settings) == []
        views = [c.get(f"/jobs/{j}").text for j in (job["id"], job2["id"], job3["id"])]
        texts = [*views, c.get("/jobs").text, c.get(f"/jobs/{job['id']}/result").text]

    db = sqlite3.connect(settings.data_dir / "mstar.db")
    texts.append("\n".join(db.iterdump()))
    db.close()
    texts += [p.read_text(errors="replace") for p in settings.blob_dir.rglob("*.json")]
    texts += [rec.getMessage() for rec in caplog.records]
    for text in texts:
        for v in MARKERS:
            assert repr(v) not in text and f"{v:.6f}" not in text


@pytest.mark.parametrize(
    ("rna", "reason"),
    [
        ({"genes": ["GENE0000"], "values": [1.0, 2.0]}, "1 genes but 2 values"),
        ({"genes": ["GENE0000"], "values": [True]}, "valid number"),
        ({"genes": ["GENE0000"], "values": ["1.5"]}, "valid number"),
        ({"genes": ["GENE0000;DROP"], "values": [1.0]}, "not a gene identifier"),
        ({"genes": ["GENE0000", "gene0000"], "values": [1.0, 2.0]}, "listed twice"),
        ({"genes": ["TP53", "EGFR"], "values": [1.0, 2.0]}, "covers 0 of the model's 20 genes"),
        ({"genes": [], "values": []}, "at least 1"),
        ({"genes": ["G"] * 100_001, "values": [1.0] * 100_001}, "at most 100000"),
    ],
)
def test_bad_rna_is_a_422_with_a_reason(tmp_path_factory, fusion_bundle, cmu_svs, rna, reason) -> None:
    tmp = tmp_path_factory.getbasetemp() / "rna-bad"
    settings = _settings(tmp, fusion_bundle)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        r = c.post(f"/slides/{slide}/analyses", json={"rna": rna})
        assert r.status_code == 422 and reason in r.text, r.text
        # NaN and Infinity are not JSON, but Python's parser reads them: refused as not finite
        raw = '{"rna": {"genes": ["GENE0000"], "values": [NaN]}}'
        r = c.post(f"/slides/{slide}/analyses", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "finite" in r.text
        assert c.get("/jobs").json()["total"] == 0
    assert _held(settings) == []


@pytest.mark.parametrize(
    ("files", "data", "reason"),
    [
        ({"rna": ("p.csv", b"\xff\xfe\x00bad")}, {}, "not UTF-8"),
        ({"rna": ("p.csv", b"")}, {}, "RNA profile is empty"),
        ({"rna": ("p.csv", b"Gene,Value\nGENE0000,high\n")}, {}, "RNA row 2: the value is not a number"),
        ({"rna": ("p.csv", b"Gene,Value\nGENE0000,1\nGENE0001,2\ngene0000,3\n")}, {}, "listed twice (rows 2 and 4"),
        ({"rna": ("p.csv", b"Gene,Value\nTP53,1\nEGFR,2\n")}, {}, "covers 0 of the model's 20 genes"),
        ({"rna": ("p.csv", b"G,1\n" * 8_400_000)}, {}, "larger than 32 MiB"),
        ({"rna": ("p.csv", b"a,b,c\nx,y,z\n")}, {}, "format not recognised"),
        ({"rna": ("p.csv", b"Gene,Value\nGENE0000,inf\n")}, {}, "not finite"),
        (
            {"rna": ("p.csv", b"Gene,Value\nGENE0000,1\n")},
            {"request": '{"rna": {"genes": ["A"], "values": [1]}}'},
            "send the RNA profile once",
        ),
        ({"rna": ("p.csv", b"Gene,Value\nGENE0000,1\n")}, {"other": "x"}, "unknown multipart part"),
        ({}, {"request": "{}"}, "must be a file"),
        ({"rna": ("p.csv", b"Gene,Value\nGENE0000,1\n")}, {"request": '{"tasks": ["nope"]}'}, "tasks"),
    ],
)
def test_bad_rna_file_is_a_422_with_a_reason(tmp_path_factory, fusion_bundle, cmu_svs, files, data, reason) -> None:
    tmp = tmp_path_factory.getbasetemp() / "rna-bad-file"
    settings = _settings(tmp, fusion_bundle)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        if not files:  # a form with no file part at all
            r = c.post(
                f"/slides/{slide}/analyses",
                data=data,
                headers={"Content-Type": "multipart/form-data; boundary=x"},
                content=b'--x\r\nContent-Disposition: form-data; name="request"\r\n\r\n{}\r\n--x--\r\n',
            )
        else:
            r = c.post(f"/slides/{slide}/analyses", files=files, data=data)
        assert r.status_code == 422 and reason in r.text, r.text
        assert c.get("/jobs").json()["total"] == 0
    assert _held(settings) == []


def test_json_keeps_its_cap_and_a_large_file_is_read(tmp_path, fusion_bundle, cmu_svs) -> None:
    settings = _settings(tmp_path, fusion_bundle)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        genes = [f"NOTMODEL{i}" for i in range(60_000)]
        big = {"genes": genes, "values": [1.5] * len(genes)}
        r = c.post(f"/slides/{slide}/analyses", json={"rna": big})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        text = "Gene,Value\n" + "".join(f"{g},1.5\n" for g in genes)  # ~1.3 MB: over the JSON cap, fine as a file
        r = c.post(f"/slides/{slide}/analyses", files={"rna": ("big.csv", text.encode())})
        assert r.status_code == 422 and "covers 0 of the model's 20 genes" in r.text  # read, then refused
        assert c.get("/jobs").json()["total"] == 0


def test_openapi_documents_both_forms(tmp_path) -> None:
    spec = create_app(_settings(tmp_path, None)).openapi()
    body = spec["paths"]["/slides/{slide_id}/analyses"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "rna" in spec["components"]["schemas"]["AnalysisRequest"]["properties"]


def test_rna_for_a_bundle_without_the_head_is_refused(tmp_path, tmp_path_factory, cmu_svs) -> None:
    from inference_fixtures import build_tiny_bundle

    settings = _settings(tmp_path, build_tiny_bundle(tmp_path_factory.getbasetemp()))
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        r = c.post(f"/slides/{slide}/analyses", json={"rna": {"genes": ["GENE0000"], "values": [1.0]}})
        assert r.status_code == 422 and "no slide + RNA head" in r.json()["error"]["message"]


def test_the_profile_goes_when_its_job_is_canceled_or_fails(tmp_path, fusion_bundle, cmu_svs) -> None:
    """A job canceled while queued ends without an attempt: its profile is removed by the cancel itself, not
    left for the periodic sweep (MSTAR_WORKER_LEASE_S apart, made long here). A job whose held profile was
    altered fails with rna_expired, and the profile is removed then too."""
    settings = _settings(tmp_path, fusion_bundle).model_copy(update={"worker_lease_s": 600.0})
    genes = fusion_genes(fusion_bundle)

    def rna(shift: float) -> dict:
        return {"genes": genes, "values": [m + shift for m in MARKERS]}

    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        first = c.post(f"/slides/{slide}/analyses", json={"rna": rna(0.0)}).json()  # all tasks: keeps the worker
        queued = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": rna(1.0)}).json()
        broken = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": rna(2.0)}).json()
        assert {p.name for p in _held(settings)} >= {queued["id"], broken["id"]}
        assert c.get(f"/jobs/{queued['id']}").json()["state"] == "queued"  # behind the first (one worker)
        (settings.blob_dir / "ephemeral" / "rna" / broken["id"]).write_bytes(b"Gene,Value\nGENE0000,1.0\n")
        r = c.post(f"/jobs/{queued['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "canceled"
        assert queued["id"] not in {p.name for p in _held(settings)}  # at once
        assert _wait(c, first["id"])["state"] == "succeeded"
        failed = _wait(c, broken["id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "rna_expired", failed
        assert "submit the analysis again" in failed["error"]["message"]
        assert _held(settings) == []


@pytest.mark.parametrize("media", ["text/csv", "text/tab-separated-values", "application/octet-stream", "text/plain"])
def test_a_profile_posted_as_the_body_is_a_422_naming_the_content_type(tmp_path, fusion_bundle, cmu_svs, media):
    """The CSV sent as the body itself (not as the multipart part) was FastAPI's "valid dictionary" 422."""
    settings = _settings(tmp_path, fusion_bundle)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        slide = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, data=STORE_ONLY).json()["id"]
        body = "Gene,Value\n" + "".join(f"{g},1.5\n" for g in fusion_genes(fusion_bundle))
        r = c.post(f"/slides/{slide}/analyses", content=body.encode(), headers={"Content-Type": media})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", r.text
        msg = r.json()["error"]["message"]
        assert f"a {media} body is not accepted" in msg and "multipart/form-data" in msg and "`rna`" in msg
        assert c.get("/jobs").json()["total"] == 0
