// Drives the /ui page in headless Chromium (Debian's, through playwright-core: no browser download) the way a
// pathologist would, and prints what it saw as JSON for tests/test_ui_viewer.py to check.
// Env: BASE_URL, API_KEY, OTHER_JOB (a job of another tenant), PACS_JOB (a succeeded PACS job of this tenant,
// which has DICOM objects), SLIDE (file to upload), SHOTS (folder), CHROMIUM.
// axe-core (pinned in ui/package-lock.json) audits every view; it is evaluated through the DevTools protocol,
// which the page's Content-Security-Policy does not apply to, so the page's own CSP stays on.
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(join(process.cwd(), "ui", "package.json"));
const { chromium } = require("playwright-core");
const env = process.env;
const out = { steps: [] };
const shots = env.SHOTS;
mkdirSync(shots, { recursive: true });
const step = (name, data = {}) => out.steps.push({ name, ...data });
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const a11y = [];

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
  const tiles = [];
  const failures = [];
  page.on("response", (r) => {
    const m = /\/tiles\/(\d+)\/(\d+)_(\d+)\.jpeg$/.exec(r.url());
    if (m) tiles.push({ level: +m[1], status: r.status(), type: r.headers()["content-type"] });
  });
  const refused = [];
  page.on("pageerror", (e) => failures.push(String(e)));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // The browser logs every 4xx the page receives; the refusals this flow provokes are counted apart.
    if (m.text().startsWith("Failed to load resource")) refused.push(m.text()); else failures.push(m.text());
  });
  page.setDefaultTimeout(30000);
  // axe-core on the page as it is now: every violation, with its impact and the elements it names.
  const audit = async (view) => {
    await page.evaluate(axeSource);
    const r = await page.evaluate(() => axe.run(document, { resultTypes: ["violations"] }));
    // 1280x800: the page itself never scrolls or overflows (only the side panels scroll), and the main column's
    // visible parts (toolbar, region tools, error, viewer, hover line) stack without overlapping.
    const layout = await page.evaluate(() => {
      const d = document.documentElement;
      const boxes = [...document.querySelectorAll("#main > *")].map((e) => [e.id, e.getBoundingClientRect()])
        .filter(([, b]) => b.height > 0);
      const overlaps = boxes.slice(1).filter(([, b], i) => b.top < boxes[i][1].bottom - 0.5).map(([id]) => id);
      const outside = [...document.querySelectorAll("#app > *, header, #signin")].filter((e) => e.offsetParent !== null)
        .map((e) => [e.id || e.tagName, e.getBoundingClientRect()])
        .filter(([, b]) => b.right > innerWidth + 0.5 || b.bottom > innerHeight + 0.5).map(([id]) => id);
      return { scrollW: d.scrollWidth, scrollH: d.scrollHeight, w: innerWidth, h: innerHeight, overlaps, outside };
    });
    a11y.push({ view, layout, rules: r.passes.length + r.violations.length + r.incomplete.length,
      violations: r.violations.map((v) => ({ id: v.id, impact: v.impact,
        nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ")) })) });
  };

  await page.goto(`${env.BASE_URL}/ui`);
  await page.screenshot({ path: join(shots, "01-sign-in.png") });
  await audit("sign-in");

  // A wrong key is refused in the page.
  await page.fill("#api-key", "not-a-valid-key-000000000000");
  await page.click("#signin-btn");
  await page.waitForFunction(() => document.getElementById("signin-error").textContent.length > 0);
  step("wrong_key", { error: await page.textContent("#signin-error"), appVisible: await page.isVisible("#app") });
  await page.screenshot({ path: join(shots, "02-wrong-key.png") });
  await audit("wrong-key");

  // Keyboard: the key field, the button and (after sign-in) the upload controls are reachable with Tab.
  await page.fill("#api-key", env.API_KEY);
  await page.focus("#api-key");
  await page.keyboard.press("Tab");
  const tabbed = await page.evaluate(() => document.activeElement.id);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#app", { state: "visible" });
  step("signed_in", { tabbedTo: tabbed, keyInLocalStorage: await page.evaluate(() => localStorage.length),
    keyInSessionStorage: await page.evaluate(() => sessionStorage.getItem("mstar.apiKey") !== null) });

  // Upload with the progress bar; the job appears in the list with live progress and finishes.
  await page.setInputFiles("#upload-file", env.SLIDE);
  await page.click("#upload-btn");
  await page.waitForFunction(() => document.getElementById("upload-status").textContent.includes("queued"), null,
    { timeout: 120000 });
  step("uploaded", { progress: await page.getAttribute("#upload-progress", "value"),
    status: await page.textContent("#upload-status") });
  await page.screenshot({ path: join(shots, "03-uploaded-job-running.png") });
  await audit("job-running");
  const states = new Set();
  const t0 = Date.now();
  while (Date.now() - t0 < 300000) {
    const s = await page.getAttribute("#jobs li[data-job-id]", "data-state");
    states.add(s);
    if (["succeeded", "failed", "canceled"].includes(s)) break;
    await page.waitForTimeout(300);
  }
  step("job_done", { states: [...states] });

  // The job opens (the upload set #job=...): results, overlay, tiles.
  await page.waitForSelector("#report-text", { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("viewer").dataset.overlay === "on", null, { timeout: 60000 });
  await page.waitForLoadState("networkidle");
  await page.waitForTimeout(500);
  const tilesBefore = tiles.length;
  const levelBefore = Math.max(...tiles.map((t) => t.level));
  await page.screenshot({ path: join(shots, "04-slide-with-heatmap.png") });
  await audit("slide-with-results");
  const viewerBox = async () => page.evaluate(() => { const b = document.getElementById("viewer").getBoundingClientRect();
    return [b.left, b.top, b.width, b.height]; });
  const boxLoaded = await viewerBox();  // the pointer has not been over the slide yet: a one-line hover message

  // Pan and zoom with the mouse: new, finer tiles load.
  const box = await page.locator("#viewer").boundingBox();
  const cx = box.x + box.width / 2, cy = box.y + box.height / 2;
  await page.mouse.move(cx, cy);
  for (let i = 0; i < 6; i++) { await page.mouse.wheel(0, -300); await page.waitForTimeout(150); }
  await page.mouse.down(); await page.mouse.move(cx + 150, cy + 80, { steps: 8 }); await page.mouse.up();
  await page.waitForLoadState("networkidle");
  await page.waitForTimeout(800);
  step("pan_zoom", { tilesBefore, tilesAfter: tiles.length, levelBefore, levelAfter: Math.max(...tiles.map((t) => t.level)),
    allOk: tiles.every((t) => t.status === 200 && t.type === "image/jpeg"),
    zoom: await page.evaluate(() => state.viewer.viewport.getZoom()) });
  await page.screenshot({ path: join(shots, "05-zoomed-in.png") });

  // Hover the most attended patch: its attention and scores are shown.
  await page.evaluate(() => state.viewer.viewport.goHome(true));
  await page.waitForTimeout(300);
  const target = await page.evaluate(() => {
    let best = null;
    for (const c of state.patches.cells.values()) if (!best || c.props.measurements.Attention > best.props.measurements.Attention) best = c;
    const s = state.patches.size;
    const p = state.viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(best.x + s / 2, best.y + s / 2));
    const r = document.getElementById("viewer").getBoundingClientRect();
    return { x: r.left + p.x, y: r.top + p.y, attention: best.props.measurements.Attention, px: best.x, py: best.y };
  });
  await page.mouse.move(target.x, target.y, { steps: 3 });
  await page.waitForFunction(() => document.getElementById("hover-info").textContent.startsWith("Patch at"));
  step("hover", { text: await page.textContent("#hover-info"), expected: target, boxLoaded,
    boxAfterHover: await viewerBox() });
  await page.screenshot({ path: join(shots, "06-hover-patch.png") });

  // Overlay toggle and opacity.
  const opacityOn = await page.evaluate(() => state.overlay.getOpacity());
  await page.click("#overlay-toggle");
  const afterToggle = { flag: await page.getAttribute("#viewer", "data-overlay"), opacity: await page.evaluate(() => state.overlay.getOpacity()) };
  await page.screenshot({ path: join(shots, "07-overlay-off.png") });
  await page.click("#overlay-toggle");
  await page.fill("#overlay-opacity", "25");
  await page.dispatchEvent("#overlay-opacity", "input");
  step("overlay", { opacityOn, afterToggle, opacityAt25: await page.evaluate(() => state.overlay.getOpacity()) });

  // Keyboard: the viewer's canvas takes focus and zooms with "+" (OpenSeadragon's keys).
  await page.evaluate(() => state.viewer.viewport.goHome(true));
  const zoomHome = await page.evaluate(() => state.viewer.viewport.getZoom());
  await page.focus("#viewer .openseadragon-canvas");
  for (let i = 0; i < 3; i++) await page.keyboard.press("+");
  await page.waitForTimeout(1500);
  step("keyboard_zoom", { before: zoomHome, after: await page.evaluate(() => state.viewer.viewport.getZoom()) });

  // Contrast (WCAG 2 relative luminance) of the page's text on its effective background.
  const contrast = await page.evaluate(() => {
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
    const bg = (e) => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3); } return [255, 255, 255]; };
    const sel = ["header h1", "header .demo-note", "#upload-btn", "#jobs .meta", "#slides .meta", "#legend small",
      "#hover-info", ".bar span", ".badge", "#result-notice", "#report blockquote", "#downloads button", "h3"];
    return sel.map((s) => { const e = document.querySelector(s); if (!e) return { s, ratio: null };
      const a = lum(rgb(getComputedStyle(e).color)), b = lum(bg(e));
      return { s, ratio: (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05) }; });
  });
  step("contrast", { items: contrast });

  // What the pathologist reads.
  step("results", {
    label: await page.textContent("#classification .label"),
    bars: await page.locator("#classification .bar").count(),
    risk: await page.textContent("#survival .risk"),
    survivalCurve: await page.locator("#survival svg path").count(),
    report: await page.textContent("#report-text"),
    badge: await page.textContent("#results .badge"),
    downloads: await page.locator("#downloads button").evaluateAll((bs) => bs.map((b) => b.dataset.href)),
    notice: await page.textContent("#result-notice"),
  });
  const dl = page.waitForEvent("download");
  await page.click("#downloads button[data-href$='annotations.geojson']");
  const file = await dl;
  step("download", { file: file.suggestedFilename() });
  const fullJob = await page.evaluate(() => state.job);

  // A region of interest. Bad input first: text that is not JSON, then a polygon that encloses no area (the API's
  // 422 reason is shown).
  await page.click("#region-paste summary");
  await page.fill("#region-geojson", "{not json");
  await page.click("#region-run");
  await page.waitForFunction(() => document.getElementById("region-status").textContent.includes("not valid JSON"));
  const notJson = await page.textContent("#region-status");
  await page.fill("#region-geojson", JSON.stringify({ type: "Polygon",
    coordinates: [[[100, 100], [300, 100], [500, 100], [100, 100]]] }));
  await page.click("#region-run");
  await page.waitForFunction(() => document.getElementById("region-status").textContent.startsWith("Region refused"));
  const noArea = await page.textContent("#region-status");
  await page.click("#region-clear");
  await page.click("#region-paste summary");
  // Escape cancels a polygon being drawn.
  await page.evaluate(() => state.viewer.viewport.goHome(true));
  await page.waitForTimeout(300);
  const vbox = await page.locator("#viewer").boundingBox();
  await page.click("#region-draw");
  await page.mouse.click(vbox.x + 100, vbox.y + 100);
  await page.mouse.click(vbox.x + 200, vbox.y + 100);
  const pointsBeforeEscape = await page.evaluate(() => region.points.length);
  await page.keyboard.press("Escape");
  const afterEscape = { points: await page.evaluate(() => region.points.length),
    pressed: await page.getAttribute("#region-draw", "aria-pressed"), status: await page.textContent("#region-status") };
  // Enter closes a polygon (from the keyboard); Clear removes it.
  await page.click("#region-draw");
  for (const [dx, dy] of [[100, 100], [200, 100], [150, 180]]) await page.mouse.click(vbox.x + dx, vbox.y + dy);
  await page.keyboard.press("Enter");
  const closedByEnter = await page.evaluate(() => ({ closed: region.closed, points: region.points.length,
    geojson: document.getElementById("region-geojson").value.length > 0 }));
  await page.click("#region-clear");
  // Draw a pentagon over the left part of the tissue (its corners on the tissue's bounding box): four clicks, then a
  // double-click on the fifth vertex closes it (its second click is not a new vertex).
  // Zoomed out a little from home, so that the whole slide (whose tissue reaches its bottom edge) is in view.
  await page.click("#region-draw");
  await page.evaluate(() => { state.viewer.viewport.goHome(true); state.viewer.viewport.zoomBy(0.8, null, true); });
  await page.waitForTimeout(300);
  const drawn = await page.evaluate(() => {
    const xs = [], ys = [];
    for (const c of state.patches.cells.values()) { xs.push(c.x); ys.push(c.y); }
    const s = state.patches.size, x0 = Math.min(...xs), x1 = Math.max(...xs) + s, y0 = Math.min(...ys), y1 = Math.max(...ys) + s;
    const xm = (x0 + x1) / 2;
    const image = [[x0, y0], [xm, y0], [xm + (x1 - xm) / 3, (y0 + y1) / 2], [xm, y1], [x0, y1]];
    const r = document.getElementById("viewer").getBoundingClientRect();
    const item = state.viewer.world.getItemAt(0);
    const page = image.map(([x, y]) => { const q = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      return [r.left + q.x, r.top + q.y]; });
    const one = item.viewerElementToImageCoordinates(new OpenSeadragon.Point(1, 0)).x - item.viewerElementToImageCoordinates(new OpenSeadragon.Point(0, 0)).x;
    return { image, page, imagePerScreenPx: one };
  });
  for (const [x, y] of drawn.page.slice(0, 4)) { await page.mouse.click(x, y); await page.waitForTimeout(120); }
  await page.mouse.dblclick(drawn.page[4][0], drawn.page[4][1]);
  await page.waitForFunction(() => region.closed);
  await page.waitForTimeout(300);
  const geojson = JSON.parse(await page.inputValue("#region-geojson"));
  await page.screenshot({ path: join(shots, "09-region-drawn.png") });
  await audit("region-drawn");
  // The run button starts the analysis of the drawn region; the job opens when it is queued.
  await page.click("#region-run");
  await page.waitForFunction((full) => state.job && state.job !== full, fullJob);
  const regionJob = await page.evaluate(() => state.job);
  const t1 = Date.now();
  let regionState = null;
  while (Date.now() - t1 < 300000) {
    regionState = await page.getAttribute(`#jobs li[data-job-id='${regionJob}']`, "data-state").catch(() => null);
    if (["succeeded", "failed", "canceled"].includes(regionState)) break;
    await page.waitForTimeout(300);
  }
  await page.waitForFunction(() => document.getElementById("viewer").dataset.overlay === "on" && region.closed,
    null, { timeout: 60000 });
  await page.waitForLoadState("networkidle");
  await page.waitForTimeout(500);
  await page.screenshot({ path: join(shots, "10-region-analysed.png") });
  step("region", { notJson, noArea, pointsBeforeEscape, afterEscape, closedByEnter, drawn, geojson, regionJob, regionState,
    statusShown: await page.textContent("#region-status"),
    currentJobs: await page.locator("#jobs li.current").evaluateAll((ls) => ls.map((l) => l.dataset.jobId)),
    shownRegion: await page.evaluate(() => region.points), fullJob });

  // Zero-shot prompts and their scores. The page's upload runs the default tasks, so this job is queued through the
  // API with the page's own key (as a script would), then opened in the page like any other job.
  const zsJob = await page.evaluate(async () => (await apiJson(`/slides/${state.slideId}/analyses`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ tasks: ["classification", "zeroshot"], prompts: ["lung adenocarcinoma", "normal lung tissue"] }),
  })).id);
  await page.evaluate((id) => { location.hash = `job=${id}`; }, zsJob);
  await page.waitForSelector("#zeroshot .bar", { timeout: 300000 });
  await page.waitForFunction(() => document.getElementById("viewer").dataset.overlay === "on", null, { timeout: 60000 });
  await page.locator("#zeroshot").scrollIntoViewIfNeeded();
  // No label runs over its bar (long prompts and class names wrap), and the line about the region job opened before
  // is gone (this job analysed the whole slide).
  const barOverlaps = await page.evaluate(() => [...document.querySelectorAll("#results .bar")].filter((b) => {
    const [label, track] = [b.children[0].getBoundingClientRect(), b.children[1].getBoundingClientRect()];
    const sameRow = label.bottom > track.top + 0.5 && label.top < track.bottom - 0.5;
    return (sameRow && label.right > track.left + 0.5) || b.children[0].scrollWidth > b.children[0].clientWidth + 0.5;
  }).map((b) => b.getAttribute("aria-label")));
  step("zeroshot", { job: zsJob, best: await page.textContent("#zeroshot strong"), barOverlaps,
    regionStatus: await page.textContent("#region-status"),
    bars: await page.locator("#zeroshot .bar").evaluateAll((bs) => bs.map((b) => b.getAttribute("aria-label"))) });
  await page.screenshot({ path: join(shots, "12-zero-shot-prompts.png") });

  // A PACS job: its slide lives in the PACS (no tiles, said so), its results show, with the DICOM download.
  await page.evaluate((id) => { location.hash = `job=${id}`; }, env.PACS_JOB);
  await page.waitForSelector("#downloads button[data-href$='/dicom']", { timeout: 60000 });
  const dicomDl = page.waitForEvent("download");
  await page.click("#downloads button[data-href$='/dicom']");
  const dicomFile = await dicomDl;
  step("pacs", { regionRunDisabled: await page.isDisabled("#region-run"), regionText: await page.inputValue("#region-geojson"),
    regionStatus: await page.textContent("#region-status"), slides: await page.textContent("#slides"),
    downloads: await page.locator("#downloads button").evaluateAll((bs) => bs.map((b) => b.dataset.href)),
    file: dicomFile.suggestedFilename(), size: (readFileSync(await dicomFile.path())).length,
    info: await page.textContent("#hover-info"), label: await page.textContent("#classification .label") });
  const currentPacs = await page.locator("#jobs li.current").evaluateAll((ls) => ls.map((l) => l.dataset.jobId));
  step("pacs_current", { current: currentPacs });
  await page.screenshot({ path: join(shots, "11-pacs-job-dicom.png") });
  await audit("pacs-job");

  // Another tenant's job is refused in the page too.
  await page.evaluate((id) => { location.hash = `job=${id}`; }, env.OTHER_JOB);
  await page.waitForFunction(() => document.getElementById("job-error").textContent.length > 0);
  step("other_tenant", { error: await page.textContent("#job-error") });
  await page.screenshot({ path: join(shots, "08-other-tenant-refused.png") });
  await audit("other-tenant");
  step("a11y", { views: a11y });
  step("errors", { failures, refused });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
