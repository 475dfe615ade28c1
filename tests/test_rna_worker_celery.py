"""An analysis with an RNA profile in the distributed mode: the gateway publishes to a real Redis, a real
`mstar worker` (Celery) runs the default pipeline with a slide + RNA head bundle on the real CMU slide, job rows in
a real PostgreSQL. The profile travels only through the shared blob store (`rna_channel`), never in the Celery
message, the job row, Redis or the worker's log, and it is gone once the job ends."""

from __future__ import annotations

import os

import httpx
import pytest
from rna_fixtures import build_fusion_bundle, fusion_genes
from services import fresh_database, live_server, mstar_worker, postgres_url, redis_server, wait_job  # noqa: F401
from sqlalchemy import create_engine, text

from service.api import create_app
from service.config import Settings

pytestmark = pytest.mark.services

KEY = "rna-celery-key-0123456789abcdef"
MARKERS = [6.24681357 + 0.01 * i for i in range(20)]


@pytest.fixture(scope="module")
def pg_db(postgres_url: str) -> str:  # noqa: F811
    return fresh_database(postgres_url, "mstar_rna_workers")


def test_rna_analysis_on_a_celery_worker(tmp_path_factory, pg_db, redis_server, cmu_svs) -> None:  # noqa: F811
    import redis

    bundle = build_fusion_bundle(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("rna-celery")
    values = {
        "MSTAR_DATA_DIR": str(root / "data"),
        "MSTAR_DATABASE_URL": pg_db,
        "MSTAR_BROKER_URL": redis_server.url,
        "MSTAR_BUNDLE_DIR": str(bundle),
    }
    log_path = root / "worker.log"
    with mstar_worker({**os.environ, **values}, "rna", log_path, ["--concurrency", "1"]):
        settings = Settings(
            **{k.removeprefix("MSTAR_").lower(): v for k, v in values.items()}, api_keys=[{"tenant": "t", "key": KEY}]
        )
        genes = fusion_genes(bundle)
        rna = {"genes": genes, "values": MARKERS}
        headers = {"Authorization": f"Bearer {KEY}"}
        with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            r = c.post("/slides", files={"file": ("CMU.svs", cmu_svs.read_bytes())}, data={"analyze": "false"})
            slide = r.json()["id"]
            r = c.post(f"/slides/{slide}/analyses", json={"tasks": ["survival"], "rna": rna})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = wait_job(c, job_id, timeout=300)
            assert job["state"] == "succeeded", job
            mm = c.get(f"/jobs/{job_id}/result").json()["multimodal"]
            assert mm["genes_used"] == len(genes) and set(mm["contributions"]) == {"wsi", "rna"}
            assert isinstance(mm["risk"], float) and mm["slide_only_risk"]
        assert not [p for p in (settings.blob_dir / "ephemeral").rglob("*") if p.is_file()]  # gone at the end
        texts = [log_path.read_text(errors="replace")]
        r_ = redis.Redis.from_url(redis_server.url)
        texts += [repr(r_.dump(k)) for k in r_.keys("*")]
        engine = create_engine(pg_db)
        with engine.connect() as conn:
            texts += [repr(row) for row in conn.execute(text("SELECT options, error_message FROM jobs"))]
            texts += [repr(row) for row in conn.execute(text("SELECT * FROM audit_events"))]
        engine.dispose()
        for t in texts:
            for v in MARKERS:
                assert repr(v) not in t and f"{v:.6f}" not in t
