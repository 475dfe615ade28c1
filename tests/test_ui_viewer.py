"""The /ui viewer in headless Chromium (Debian package) driven by Playwright (playwright-core from npm, no browser
download): sign in, upload the real CMU slide, wait for the job, pan and zoom, toggle the heatmap, hover a patch,
read the results; draw a region of interest and analyse it alone; open a PACS job and download its DICOM objects;
a wrong key and another tenant's job are refused in the page; axe-core audits every view. Everything behind it is
real: uvicorn, the embedded runner, the tiny exported bundle, Orthanc with DICOMweb holding the CMU slide as DICOM
WSI. Screenshots go to $MSTAR_UI_SHOTS (docs/viewer when refreshing the committed ones) or a temporary folder.
A second, shorter test (no PACS) switches jobs while the answers about the job opened before are held back, and
outlines a MultiPolygon region.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from inference_fixtures import build_tiny_bundle
from services import dicomize, live_server, run_orthanc, wait_job
from shapely.geometry import MultiPolygon, Point, shape

from service.api import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY_A = "ui-tenant-a-key-0123456789abcdef"
KEY_B = "ui-tenant-b-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
PACS_USERS = {"pacs": "ui-s3cret-pw"}


@pytest.fixture(scope="module")
def playwright_ready() -> None:
    if shutil.which("node") is None or not Path(CHROMIUM).exists():
        pytest.fail("node and Debian chromium are needed: run `bash tests/sysdeps.sh`")
    if not (ROOT / "ui" / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT / "ui", check=True, timeout=300)


_wait = functools.partial(wait_job, timeout=300)  # a job through the whole stack


@pytest.fixture(scope="module")
def pacs(cmu_svs: Path, tmp_path_factory):
    """A real Orthanc (DICOMweb) holding the CMU slide as a DICOM WSI series: (server config, study UID)."""
    import pydicom

    with run_orthanc(users=PACS_USERS) as orthanc:
        files = dicomize(cmu_svs, tmp_path_factory.mktemp("ui-dicomized"))
        orthanc.upload(files)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        user, pw = next(iter(PACS_USERS.items()))
        server = {"name": "main", "tenant": "a", "url": orthanc.url, "auth": "basic", "username": user, "password": pw}
        yield server, study


def test_viewer_end_to_end(
    playwright_ready, pacs, monkeypatch, tmp_path: Path, tmp_path_factory, cmu_svs: Path
) -> None:
    bundle = build_tiny_bundle(tmp_path_factory.getbasetemp())
    server, study = pacs
    monkeypatch.setenv("MSTAR_PACS_SERVERS", json.dumps([server]))  # the spawned workers read it too
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
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as a:
            r = a.post("/pacs/analyses", json={"pacs": "main", "study_uid": study})
            assert r.status_code == 202, r.text
            pacs_job = _wait(a, r.json()["id"])  # before the page's upload, so the two never share the worker
        assert pacs_job["state"] == "succeeded", pacs_job
        env = {
            **os.environ,
            "BASE_URL": url,
            "API_KEY": KEY_A,
            "OTHER_JOB": other,
            "PACS_JOB": pacs_job["id"],
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
        roi = seen["region"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as a:
            job = a.get(f"/jobs/{roi['fullJob']}").json()
            result = a.get(f"/jobs/{job['id']}/result").json()
            full_fc = a.get(f"/jobs/{job['id']}/annotations.geojson").json()
            region_job = a.get(f"/jobs/{roi['regionJob']}").json()
            region_result = a.get(f"/jobs/{roi['regionJob']}/result").json()
            region_fc = a.get(f"/jobs/{roi['regionJob']}/annotations.geojson").json()
            zs_result = a.get(f"/jobs/{seen['zeroshot']['job']}/result").json()

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
    # The patch's three lines of scores never resize the slide under the pointer (the hover line has a fixed height).
    assert hover["boxAfterHover"] == hover["boxLoaded"] and len(hover["text"]) > 200
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
    # the wrong key's 401, the other tenant's 404, the flat region's 422 and the PACS slide's tiles' 415
    statuses = sorted(int(re.search(r"status of (\d{3})", m).group(1)) for m in seen["errors"]["refused"])
    assert statuses == [401, 404, 415, 422], seen["errors"]["refused"]
    assert len(list(shots.glob("*.png"))) == 12
    # Zero-shot: the prompts and their probabilities as the result has them, the best match named.
    zs = seen["zeroshot"]
    assert zs["best"] == zs_result["zeroshot"]["best"]
    want = sorted(zs_result["zeroshot"]["prompts"], key=lambda p: -p["probability"])
    assert zs["bars"] == [f"{p['prompt']} {100 * p['probability']:.1f} percent" for p in want]
    assert zs["barOverlaps"] == [] and zs["regionStatus"] == ""  # readable at 1280x800; no stale region line

    # DICOM: offered (and downloadable) for the PACS job only, never for an upload job.
    assert not any(h.endswith("/dicom") for h in res["downloads"]) and job["links"]["dicom"] is None
    pacs_seen = seen["pacs"]
    assert f"/jobs/{pacs_job['id']}/dicom" in pacs_seen["downloads"] and pacs_job["links"]["dicom"]
    assert pacs_seen["file"] == f"{pacs_job['id']}-dicom.zip" and pacs_seen["size"] > 1000
    assert "lives in a PACS" in pacs_seen["info"] and pacs_seen["label"]
    # The region drawn on the uploaded slide is forgotten when another slide's job opens: it is never sent for it.
    assert pacs_seen["regionRunDisabled"] and pacs_seen["regionText"] == "" and pacs_seen["regionStatus"] == ""
    assert "PACS series" in pacs_seen["slides"] and "0 × 0" not in pacs_seen["slides"]

    # The region: bad input explained, Escape cancels, Enter and double-click close, and the analysis of the drawn
    # polygon covers exactly the full analysis's patches whose centres lie inside it.
    assert "not valid JSON" in roi["notJson"] and "Region refused" in roi["noArea"] and "no area" in roi["noArea"]
    assert roi["pointsBeforeEscape"] == 2 and roi["afterEscape"]["points"] == 0
    assert roi["afterEscape"]["pressed"] == "false" and "cancelled" in roi["afterEscape"]["status"]
    assert roi["closedByEnter"] == {"closed": True, "points": 3, "geojson": True}
    assert roi["regionState"] == "succeeded" and region_job["state"] == "succeeded"
    ring = roi["geojson"]["geometry"]["coordinates"][0]
    assert len(ring) == 6 and ring[0] == ring[-1]  # five vertices: the double-click's second click added none
    tol = 2 * roi["drawn"]["imagePerScreenPx"]
    for (x, y), (ex, ey) in zip(ring, roi["drawn"]["image"], strict=False):
        assert abs(x - ex) <= tol and abs(y - ey) <= tol, (ring, roi["drawn"]["image"])
    assert region_job["options"]["region"] == roi["geojson"]  # what the page sent is what the job ran with
    polygon = shape(roi["geojson"]["geometry"])

    def centres(fc: dict) -> set[tuple[float, float]]:
        out = set()
        for f in fc["features"]:
            if f["properties"]["objectType"] == "detection":
                (x0, y0), _, (x1, y1) = f["geometry"]["coordinates"][0][:3]
                out.add(((x0 + x1) / 2, (y0 + y1) / 2))
        return out

    inside = {c for c in centres(full_fc) if polygon.contains(Point(c))}
    got = centres(region_fc)
    assert got and all(polygon.contains(Point(c)) for c in got)
    assert got == inside and len(got) < len(centres(full_fc))
    shown = shape({"type": "Polygon", "coordinates": [[*roi["shownRegion"], roi["shownRegion"][0]]]})
    assert region_result["tiling"]["region"] and shown.equals(polygon)  # the job's region is outlined on the slide
    assert roi["statusShown"] == f"Job {roi['regionJob'][:8]} analysed only the outlined region."
    assert roi["currentJobs"] == [roi["regionJob"]] and seen["pacs_current"]["current"] == [pacs_job["id"]]

    # axe-core: no serious or critical violation in any view.
    views = seen["a11y"]["views"]
    assert [v["view"] for v in views] == [
        "sign-in",
        "wrong-key",
        "job-running",
        "slide-with-results",
        "region-drawn",
        "pacs-job",
        "other-tenant",
    ]
    assert all(v["rules"] > 20 for v in views)  # axe really ran its rules
    for v in views:  # 1280x800: no page scroll, nothing past the window, the main column's parts never overlap
        lay = v["layout"]
        assert (lay["w"], lay["h"]) == (1280, 800) and lay["scrollW"] <= 1280 and lay["scrollH"] <= 800, v
        assert lay["overlaps"] == [] and lay["outside"] == [], v
    bad = [(v["view"], x) for v in views for x in v["violations"] if x["impact"] in ("serious", "critical")]
    assert bad == [], bad


# Opens job B after job A (and B alone) while the answers about A are held back by Playwright's routing, and prints
# what the page shows once every held answer has come: only B's results, B's patches and B's heatmap may be there.
# Env: BASE_URL, API_KEY, FULL_JOB (A), REGION_JOB (B), CHROMIUM; run with the repository root as the working folder.
SWITCH_FLOW = r"""
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(join(process.cwd(), "ui", "package.json"));
const { chromium } = require("playwright-core");
const env = process.env;
const A = env.FULL_JOB, B = env.REGION_JOB;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const browser = await chromium.launch({ executablePath: env.CHROMIUM, headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"] });
const out = { rounds: {}, failures: [] };
try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
  page.setDefaultTimeout(30000);
  page.on("pageerror", (e) => out.failures.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") out.failures.push(m.text()); });
  // Holds back the first request whose path matches `re` until release() is called: started resolves when the page
  // asks for it, done once it is answered (or found aborted by the page).
  const hold = async (re) => {
    let started, done, release, used = false;
    const s = new Promise((r) => { started = r; }), d = new Promise((r) => { done = r; });
    const go = new Promise((r) => { release = r; });
    await page.route((u) => re.test(new URL(u).pathname), async (route) => {
      if (used) { await route.fallback(); return; }
      used = true;
      started();
      await go;
      await route.continue().catch(() => {});  // the page may have aborted it meanwhile
      done();
    });
    return { started: s, done: d, release };
  };
  const shownB = () => page.waitForFunction((b) => state.job === b && region.closed &&
    document.getElementById("viewer").dataset.overlay === "on" && document.querySelector("#downloads li") !== null, B);
  const seen = () => page.evaluate(() => ({
    job: state.job,
    worldItems: state.viewer.world.getItemCount(),
    headings: document.querySelectorAll("#classification p").length,
    bars: document.querySelectorAll("#classification .bar").length,
    downloads: [...document.querySelectorAll("#downloads button")].map((b) => b.dataset.href),
    patches: state.patches ? state.patches.cells.size : null,
    outlines: [...document.querySelectorAll(".roi-layer path.roi")].map((p) => Number(p.dataset.rings)),
    shown: region.shown,
    regionStatus: document.getElementById("region-status").textContent,
  }));
  const open = (id) => page.evaluate((j) => { location.hash = `job=${j}`; }, id);

  await page.goto(`${env.BASE_URL}/ui`);
  await page.fill("#api-key", env.API_KEY);
  await page.click("#signin-btn");
  await page.waitForSelector("#jobs li[data-job-id]");
  // B alone, its first GET /jobs/B held until a poll of the job list (which finds B succeeded) has been answered.
  let held = await hold(new RegExp(`^/jobs/${B}$`));
  await open(B);
  await held.started;
  await page.waitForResponse((r) => new URL(r.url()).pathname === "/jobs");
  await sleep(200);
  held.release();
  await held.done;
  await shownB();
  await sleep(500);
  out.rounds.alone = await seen();
  // A, then B 100 ms later while A's results are on their way; they come once B is shown.
  held = await hold(new RegExp(`^/jobs/${A}/result$`));
  await open(A);
  await held.started;
  await sleep(100);
  await open(B);
  await shownB();
  held.release();
  await held.done;
  await sleep(800);
  out.rounds.resultsLate = await seen();
  // A, then B while A's heatmap is on its way; it comes once B is shown.
  held = await hold(new RegExp(`^/jobs/${A}/heatmap$`));
  await open(A);
  await held.started;
  await open(B);
  await shownB();
  held.release();
  await held.done;
  await sleep(1200);  // time for a late heatmap to be decoded and added to the slide
  out.rounds.heatmapLate = await seen();
  // The overlay toggle hides every heatmap on the slide.
  await page.uncheck("#overlay-toggle");
  out.opacitiesOff = await page.evaluate(() => {
    const w = state.viewer.world;
    return [...Array(w.getItemCount()).keys()].slice(1).map((i) => w.getItemAt(i).getOpacity());
  });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
"""


def test_viewer_job_switch_and_multipolygon_region(
    playwright_ready, tmp_path: Path, tmp_path_factory, cmu_svs: Path
) -> None:
    """Answers about a job opened before never land on the job opened after it (results, patches, heatmap), a job's
    results are shown once, the overlay toggle acts on the open job's heatmap, and a MultiPolygon region (one square
    with a hole, another apart) is outlined whole on the slide."""
    bundle = build_tiny_bundle(tmp_path_factory.getbasetemp())
    settings = Settings(
        data_dir=tmp_path / "data",
        bundle_dir=bundle,
        runner_workers=1,
        runner_poll_s=0.2,
        api_keys=[{"tenant": "a", "key": KEY_A}],
    )

    def square(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [square(200, 200, 1100, 1100), square(500, 500, 800, 800)],
            [square(1300, 1600, 2000, 2300)],
        ],
    }
    with live_server(create_app(settings)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as a:
            r = a.post("/slides", files={"file": ("cmu.svs", cmu_svs.read_bytes())})
            assert r.status_code == 202, r.text
            slide, full = r.json()["slide"]["id"], r.json()["job"]["id"]
            r = a.post(f"/slides/{slide}/analyses", json={"region": multi})
            assert r.status_code == 202, r.text
            full, reg = _wait(a, full), _wait(a, r.json()["id"])
            assert full["state"] == reg["state"] == "succeeded", (full, reg)
            result = a.get(f"/jobs/{reg['id']}/result").json()
            fc = a.get(f"/jobs/{reg['id']}/annotations.geojson").json()
            full_fc = a.get(f"/jobs/{full['id']}/annotations.geojson").json()
        flow = tmp_path / "switch_flow.mjs"
        flow.write_text(SWITCH_FLOW)
        env = {
            **os.environ,
            "BASE_URL": url,
            "API_KEY": KEY_A,
            "FULL_JOB": full["id"],
            "REGION_JOB": reg["id"],
            "CHROMIUM": CHROMIUM,
        }
        proc = subprocess.run(["node", str(flow)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])

    def detections(c: dict) -> int:
        return sum(f["properties"]["objectType"] == "detection" for f in c["features"])

    assert detections(fc) < detections(full_fc)  # the patches on the page tell the two jobs apart
    heads = result["classification"]
    want = {
        "job": reg["id"],
        "worldItems": 2,  # the slide and the region job's heatmap, nothing of the job opened before
        "headings": len(heads),  # the results once, not twice, and not the other job's too
        "bars": sum(len(v["probabilities"]) for v in heads.values()),
        "patches": detections(fc),
        "outlines": [2, 1],  # both polygons, the first with its hole
        "regionStatus": f"Job {reg['id'][:8]} analysed only the outlined region.",
    }
    rounds = seen["rounds"]
    assert list(rounds) == ["alone", "resultsLate", "heatmapLate"]
    wrong = {name: {k: (got[k], v) for k, v in want.items() if got[k] != v} for name, got in rounds.items()}
    assert not any(wrong.values()), wrong  # (seen, wanted) per round
    roi = next(f for f in fc["features"] if f["properties"].get("name") == "Region of interest")
    for name, got in rounds.items():
        assert got["downloads"] and all(f"/jobs/{reg['id']}/" in h for h in got["downloads"]), (name, got)
        outline = MultiPolygon([(rings[0], rings[1:]) for rings in got["shown"]])
        assert outline.equals(shape(roi["geometry"])) and outline.equals(shape(multi)), (name, got["shown"])
    assert seen["opacitiesOff"] == [0]
    assert seen["failures"] == [], seen["failures"]  # no script error, no revoked heatmap URL read
