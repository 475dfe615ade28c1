"""The /ui viewer in headless Chromium (Debian package) driven by Playwright (playwright-core from npm, no browser
download): sign in, upload the real CMU slide, wait for the job, pan and zoom, toggle the heatmap, hover a patch,
read the results; a wrong key and another tenant's job are refused in the page. Everything behind it is real:
uvicorn, the embedded runner, the tiny exported bundle. Screenshots go to $MSTAR_UI_SHOTS (docs/viewer when
refreshing the committed ones) or a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from inference_fixtures import build_tiny_bundle
from services import live_server

from service.api import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY_A = "ui-tenant-a-key-0123456789abcdef"
KEY_B = "ui-tenant-b-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def playwright_ready() -> None:
    if shutil.which("node") is None or not Path(CHROMIUM).exists():
        pytest.fail("node and Debian chromium are needed: run `bash tests/sysdeps.sh`")
    if not (ROOT / "ui" / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT / "ui", check=True, timeout=300)


def test_viewer_end_to_end(playwright_ready, tmp_path: Path, tmp_path_factory, cmu_svs: Path) -> None:
    bundle = build_tiny_bundle(tmp_path_factory.getbasetemp())
    settings = Settings(
        data_dir=tmp_path / "data",
        bundle_dir=bundle,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[{"tenant": "a", "key": KEY_A}, {"tenant": "b", "key": KEY_B}],
    )
    shots = Path(os.environ.get("MSTAR_UI_SHOTS") or tmp_path / "shots")
    with live_server(create_app(settings)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60) as b:
            r = b.post("/slides", files={"file": ("b.svs", cmu_svs.read_bytes())}, data={"analyze": "false"})
            other = b.post(f"/slides/{r.json()['id']}/analyses", json={"tasks": ["embedding"]}).json()["id"]
            b.post(f"/jobs/{other}/cancel")  # it only has to exist
        env = {
            **os.environ,
            "BASE_URL": url,
            "API_KEY": KEY_A,
            "OTHER_JOB": other,
            "SLIDE": str(cmu_svs),
            "SHOTS": str(shots),
            "CHROMIUM": CHROMIUM,
        }
        proc = subprocess.run(
            ["node", str(ROOT / "tests" / "ui" / "viewer_flow.mjs")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        seen = {s["name"]: s for s in json.loads(proc.stdout.strip().splitlines()[-1])["steps"]}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as a:
            job = a.get("/jobs").json()["items"][0]
            result = a.get(f"/jobs/{job['id']}/result").json()

    assert "invalid API key" in seen["wrong_key"]["error"] and not seen["wrong_key"]["appVisible"]
    assert seen["signed_in"]["tabbedTo"] == "signin-btn"
    assert seen["signed_in"]["keyInSessionStorage"] and seen["signed_in"]["keyInLocalStorage"] == 0
    assert float(seen["uploaded"]["progress"]) == 100 and "queued" in seen["uploaded"]["status"]
    assert seen["job_done"]["states"][-1] == "succeeded" or "succeeded" in seen["job_done"]["states"]
    pz = seen["pan_zoom"]
    assert pz["allOk"] and pz["tilesAfter"] > pz["tilesBefore"] > 0 and pz["levelAfter"] > pz["levelBefore"]
    assert pz["zoom"] > 1.5
    hover = seen["hover"]
    assert f"Patch at ({hover['expected']['px']}, {hover['expected']['py']})" in hover["text"]
    assert "Attention" in hover["text"] and "probability" in hover["text"]
    ov = seen["overlay"]
    assert ov["opacityOn"] == pytest.approx(0.6) and ov["afterToggle"] == {"flag": "off", "opacity": 0}
    assert ov["opacityAt25"] == pytest.approx(0.25)
    kz = seen["keyboard_zoom"]
    assert kz["after"] > 1.2 * kz["before"]  # "+" on the focused viewer zooms in
    ratios = {c["s"]: c["ratio"] for c in seen["contrast"]["items"]}
    assert all(r is not None and r >= 4.5 for r in ratios.values()), ratios  # WCAG AA for normal text
    res = seen["results"]
    head = next(iter(result["classification"]))
    assert res["label"] == result["classification"][head]["label"]
    assert res["bars"] == len(result["classification"][head]["probabilities"])
    assert res["report"] == result["report"]["text"] and res["badge"] == "AI draft"
    assert float(res["risk"]) == pytest.approx(next(iter(result["survival"].values()))["risk"], abs=1e-3)
    assert res["survivalCurve"] >= 2 and result["notice"] in res["notice"]
    assert {h.rsplit("/", 1)[-1] for h in res["downloads"]} >= {"result", "features", "annotations.geojson"}
    assert seen["download"]["file"].endswith(".geojson")
    assert "another account" in seen["other_tenant"]["error"]
    assert seen["errors"]["failures"] == [], seen["errors"]["failures"]  # no script error, no CSP violation
    assert len(seen["errors"]["refused"]) == 2  # the wrong key's 401 and the other tenant's 404, nothing else
    assert len(list(shots.glob("*.png"))) == 8
