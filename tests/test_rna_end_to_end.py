"""One real slide, one RNA profile, two ways in: `mstar analyze --rna` (a real subprocess) and `POST
/slides/{id}/analyses` with the profile as a multipart file (real uvicorn, the embedded runner), on the real
CMU-1-Small-Region.svs with the tiny bundle that carries a slide + RNA head (`rna_fixtures`). The two
result.json files must agree on the fused risk, the slide-only risk and the per-modality contributions, and the
fused numbers must equal an ONNX Runtime run of the bundle's fusion graph on the patch features the job wrote,
with the profile mapped by hand (one model gene left out, so it takes the manifest's imputation mean)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from rna_fixtures import build_fusion_bundle
from services import live_server, wait_job

from service.api import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
MSTAR = Path(sys.executable).with_name("mstar")
KEY = "rna-e2e-key-0123456789abcdef"
# values no other number in a result or log would be: if one shows up, the profile leaked
MARKER = 5.86420975


@pytest.fixture(scope="module")
def fusion_bundle(tmp_path_factory) -> Path:
    return build_fusion_bundle(tmp_path_factory.getbasetemp())


def _onnx_fused(bundle: Path, feats: np.ndarray, profile: dict[str, float]) -> dict:
    """The fusion graph run directly: the profile in the manifest's gene order, missing genes at their mean."""
    import onnxruntime as ort

    spec = json.loads((bundle / "bundle.json").read_text())["rna_fusion"]
    rna = np.array(
        [profile.get(g, m) for g, m in zip(spec["genes"], spec["impute_mean"], strict=True)], dtype=np.float32
    )
    sess = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])
    logits, wsi, rna_part = sess.run(
        ["logits", "wsi_contribution", "rna_contribution"], {"features": feats.astype(np.float32), "rna": rna}
    )
    surv = np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
    return {"risk": float(-surv.sum()), "wsi": wsi, "rna": rna_part}


def test_cli_and_api_agree_with_onnxruntime_on_the_real_slide(tmp_path, fusion_bundle, cmu_svs, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    genes = json.loads((fusion_bundle / "bundle.json").read_text())["rna_fusion"]["genes"]
    profile = {g: MARKER + 0.37 * i for i, g in enumerate(genes[1:], start=1)}  # genes[0] left out
    rna_file = tmp_path / "case-17.csv"
    rna_file.write_text(
        "Gene,Value\n" + "".join(f"{g},{v!r}\n" for g, v in profile.items()) + f"NOTAMODELGENE,{MARKER!r}\n"
    )
    started = time.monotonic()

    # 1. the command line, as a user runs it
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(MSTAR), "analyze", str(cmu_svs), "--bundle", str(fusion_bundle), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--task", "survival", "--rna", str(rna_file)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((out / "result.json").read_text())
    with h5py.File(out / "features.h5", "r") as f:
        cli_feats = f["features"][:]

    # 2. the HTTP API, the profile as the file it is
    settings = Settings(
        data_dir=tmp_path / "data",
        bundle_dir=fusion_bundle,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[{"tenant": "t", "key": KEY}],
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        r = c.post("/slides", files={"file": (cmu_svs.name, cmu_svs.read_bytes())}, data={"analyze": "false"})
        assert r.status_code == 201, r.text
        r = c.post(
            f"/slides/{r.json()['id']}/analyses",
            files={"rna": (rna_file.name, rna_file.read_bytes(), "text/csv")},
            data={"request": '{"tasks": ["survival"]}'},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_job(c, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        api_text = c.get(f"/jobs/{job_id}/result").text
        api = json.loads(api_text)
        (tmp_path / "api_features.h5").write_bytes(c.get(f"/jobs/{job_id}/features").content)
    with h5py.File(tmp_path / "api_features.h5", "r") as f:
        api_feats = f["features"][:]

    # the same patches and features both ways
    assert cli["tiling"]["patches"] == api["tiling"]["patches"] > 0
    np.testing.assert_allclose(api_feats, cli_feats, atol=1e-5)
    a, b = cli["multimodal"], api["multimodal"]
    assert (a["genes_used"], a["genes_missing"], a["genes_unknown"]) == (len(genes) - 1, 1, 1)
    assert {k: b[k] for k in ("genes_used", "genes_missing", "genes_unknown")} == {
        k: a[k] for k in ("genes_used", "genes_missing", "genes_unknown")
    }
    assert b["risk"] == pytest.approx(a["risk"], abs=1e-5)
    assert set(a["slide_only_risk"]) == set(b["slide_only_risk"]) == set(cli["survival"]) != set()
    for head, risk in a["slide_only_risk"].items():
        assert risk == cli["survival"][head]["risk"]
        assert b["slide_only_risk"][head] == pytest.approx(risk, abs=1e-5)
    for m in ("wsi", "rna"):
        np.testing.assert_allclose(b["contributions"][m], a["contributions"][m], atol=1e-5)

    # the fused numbers are the fusion graph's, recomputed here from the job's own features
    ref = _onnx_fused(fusion_bundle, cli_feats, profile)
    assert a["risk"] == pytest.approx(ref["risk"], abs=1e-5)
    np.testing.assert_allclose(a["contributions"]["wsi"], ref["wsi"], atol=1e-5)
    np.testing.assert_allclose(a["contributions"]["rna"], ref["rna"], atol=1e-5)
    # the profile changes the answer: the RNA part is not zero and the fused risk is not the slide-only one
    assert np.abs(ref["rna"]).max() > 1e-4
    assert all(abs(a["risk"] - r) > 1e-6 for r in a["slide_only_risk"].values())

    # the profile's values are in neither result, nor the CLI's output and files, nor the database, nor any log
    # record of the gateway, nor anything the runner's worker processes write to stderr (the worker log of a real
    # `mstar worker` is grepped in test_rna_worker_celery)
    db = sqlite3.connect(settings.data_dir / "mstar.db")
    dump = "\n".join(db.iterdump())
    db.close()
    captured = capfd.readouterr()
    texts = [proc.stdout, proc.stderr, api_text, dump, captured.out, captured.err]
    texts += [p.read_text(errors="replace") for p in out.glob("*.json")]
    texts += [rec.getMessage() for rec in caplog.records]
    for text in texts:
        for v in [MARKER, *profile.values()]:
            assert repr(v) not in text and f"{v:.6f}" not in text
    assert time.monotonic() - started < 120  # tiny models: both paths well under a minute on an idle machine


def test_cli_refuses_bad_rna_with_the_reason(tmp_path, tmp_path_factory, fusion_bundle, cmu_svs) -> None:
    """Each a one-line error naming the problem (exit 2), before the slide is read; never a traceback. The
    first runs as a real process; the rest through the same `mstar` group in-process (a start-up is ~10 s)."""
    from click.testing import CliRunner
    from inference_fixtures import build_tiny_bundle

    from service.cli import main
    from service.inference.rna_input import MAX_BYTES

    genes = json.loads((fusion_bundle / "bundle.json").read_text())["rna_fusion"]["genes"]
    good = "Gene,Value\n" + "".join(f"{g},1.5\n" for g in genes)
    cases = {
        "dup.csv": (good + f"{genes[3].lower()},2.5\n", f"gene listed twice (rows 5 and {len(genes) + 2}"),
        "empty.csv": ("", "RNA profile is empty"),
        "word.csv": ("Gene,Value\n" + f"{genes[0]},high\n", "RNA row 2: the value is not a number"),
        "nan.csv": ("Gene,Value\n" + f"{genes[0]},nan\n", "RNA row 2: the value is not finite"),
        "inf.tsv": ("Gene\tValue\n" + f"{genes[0]}\t-inf\n", "RNA row 2: the value is not finite"),
        "unknown.csv": ("Gene,Value\nTP53,1\nEGFR,2\n", "covers 0 of the model's 20 genes"),
        "binary.csv": ("\x00\x01PNG", "format not recognised"),
        "huge.csv": (None, f"larger than {MAX_BYTES >> 20} MiB"),
    }
    out = tmp_path / "out"
    base = ["analyze", str(cmu_svs), "--task", "survival", "--out", str(out), "--bundle"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for i, (name, (text, reason)) in enumerate(cases.items()):
        path = tmp_path / name
        if text is None:
            with path.open("wb") as f:
                f.truncate(MAX_BYTES + 1)
        else:
            path.write_text(text)
        args = [*base, str(fusion_bundle), "--rna", str(path)]
        if i == 0:
            proc = subprocess.run([str(MSTAR), *args], env=env, capture_output=True, text=True, timeout=120)
            code, output = proc.returncode, proc.stderr
        else:
            res = CliRunner().invoke(main, args)
            code, output = res.exit_code, res.output
        assert code == 2 and reason in output, (name, output[-2000:])
        assert "Traceback" not in output and not (out / "result.json").exists()
    res = CliRunner().invoke(
        main, [*base, str(build_tiny_bundle(tmp_path_factory.getbasetemp())), "--rna", str(tmp_path / "word.csv")]
    )
    assert res.exit_code == 2 and "no slide + RNA head" in res.output
