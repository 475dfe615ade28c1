"""Batch manifests with an RNA file per slide (column `rna`): parsed and checked, read through the same readers
and the same ephemeral channel as an API request, both with database access (`BatchService`, as `mstar submit`
does) and through the HTTP gateway (`HttpBatch`, `mstar submit --server`), on the real CMU slide."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rna_fixtures import build_fusion_bundle, fusion_genes
from services import live_server

from service.api import create_app
from service.batch import BatchService, parse_manifest
from service.batch_http import HttpBatch
from service.config import Settings
from service.errors import InvalidParameterError

KEY = "rna-batch-key-0123456789abcdef"


def _profile(path: Path, genes: list[str], shift: float) -> Path:
    path.write_text("Gene,Value\n" + "".join(f"{g},{1.0 + shift + 0.1 * i}\n" for i, g in enumerate(genes)))
    return path


def test_manifest_rna_column(tmp_path, cmu_svs) -> None:
    (tmp_path / "rna").mkdir()
    (tmp_path / "rna" / "a.csv").write_text("Gene,Value\nTP53,1\n")
    m = tmp_path / "m.csv"
    m.write_text(f"slide,id,rna,site\n{cmu_svs},a,rna/a.csv,x\n{cmu_svs.parent / 'other.svs'},b,,y\n")
    rows = parse_manifest(m)
    assert rows[0].rna == str((tmp_path / "rna" / "a.csv").resolve()) and rows[1].rna is None
    assert rows[0].meta == {"site": "x"}  # the RNA path is not item metadata
    m.write_text(f"slide,rna\n{cmu_svs},rna/missing.csv\n")
    with pytest.raises(InvalidParameterError, match=r"line 2: RNA file 'rna/missing\.csv' does not exist"):
        parse_manifest(m)
    m.write_text(f"slide,rna\n{cmu_svs},s3://bucket/a.csv\n")
    with pytest.raises(InvalidParameterError, match="local path"):
        parse_manifest(m)


def test_batch_lines_with_rna_run_the_fused_head(tmp_path, tmp_path_factory, cmu_svs) -> None:
    bundle = build_fusion_bundle(tmp_path_factory.getbasetemp())
    genes = fusion_genes(bundle)
    settings = Settings(
        data_dir=tmp_path / "data",
        bundle_dir=bundle,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[{"tenant": "default", "key": KEY}],
    )
    _profile(tmp_path / "good.csv", genes, 0.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("Gene,Value\nGENE0000,nan\n")
    copy = tmp_path / "copy.svs"
    copy.write_bytes(cmu_svs.read_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,id,rna\n{cmu_svs},withrna,good.csv\n{copy},badrna,bad.csv\n")
    with live_server(create_app(settings)) as url:  # its embedded runner runs the batch's queued jobs
        svc = BatchService(settings)
        try:
            report = svc.submit(manifest, options={"tasks": ["survival"]})
            assert len(report.queued) == 1 and report.failed_ingest == 1
            deadline = time.monotonic() + 300
            while not (st := svc.status(report.batch_id)).finished:
                assert time.monotonic() < deadline
                time.sleep(0.5)
            items = {it.name: it for it in st.items}
            assert items["badrna"].error_code == "invalid_parameter" and "not finite" in items["badrna"].reason
            assert items["withrna"].state == "succeeded"
            result = svc._result_json(items["withrna"].job_id)
            assert result["multimodal"]["genes_used"] == len(genes) and "slide_only_risk" in result["multimodal"]
        finally:
            svc.close()

        # the same manifest shape through the gateway: the slide is stored, then analysed with the file
        http_manifest = tmp_path / "h.csv"
        _profile(tmp_path / "other.csv", genes, 0.5)
        http_manifest.write_text(f"slide,rna\n{cmu_svs},other.csv\n")
        hb = HttpBatch(url, KEY, tmp_path / "state")
        out = hb.submit(http_manifest)
        assert out["queued"] == 1, out
        deadline = time.monotonic() + 300
        while (rows := hb.status(out["batch_id"]))[0]["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert rows[0]["state"] == "succeeded", rows
        job = hb.client.get(f"/jobs/{rows[0]['job_id']}/result").json()
        assert job["multimodal"]["risk"] != result["multimodal"]["risk"]
    held = settings.blob_dir / "ephemeral" / "rna"
    assert not held.is_dir() or not [p for p in held.rglob("*") if p.is_file()]


def test_rna_lines_need_a_bundle_with_the_head(tmp_path, tmp_path_factory, cmu_svs) -> None:
    from inference_fixtures import build_tiny_bundle

    (tmp_path / "a.csv").write_text("Gene,Value\nTP53,1\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,rna\n{cmu_svs},a.csv\n")
    for bundle in (None, build_tiny_bundle(tmp_path_factory.getbasetemp())):
        svc = BatchService(Settings(data_dir=tmp_path / "data", bundle_dir=bundle))
        try:
            with pytest.raises(InvalidParameterError, match=r"no model bundle|no slide \+ RNA head"):
                svc.submit(manifest)
        finally:
            svc.close()
