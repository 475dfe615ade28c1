// mSTAR viewer: vanilla JS over the service's REST API. The API key lives in sessionStorage (this tab only) and
// goes out as a bearer header on every request, tiles included (OpenSeadragon's ajax tile loading), so the page
// can see exactly what the key's tenant can see and nothing else.
"use strict";

const KEY = "mstar.apiKey";
// state.open: the job now open (see openJob); state.job is its id and state.overlay its heatmap on the slide.
const state = { key: sessionStorage.getItem(KEY), viewer: null, job: null, open: null, overlay: null,
  patches: null, poll: null, slideId: null, slideOpen: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, opts = {}) {
  const headers = { Authorization: `Bearer ${state.key}`, ...(opts.headers || {}) };
  const r = await fetch(path, { ...opts, headers });
  if (!r.ok) {
    let code = "error", msg = `${r.status} ${r.statusText}`;
    try { const b = await r.json(); code = b.error.code; msg = b.error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, code, msg);
  }
  return r;
}
const apiJson = async (path, opts) => (await api(path, opts)).json();

// --- sign in -------------------------------------------------------------------------------------------------
async function signIn(key) {
  state.key = key;
  try {
    await apiJson("/jobs?limit=1");
  } catch (e) {
    state.key = null;
    sessionStorage.removeItem(KEY);
    $("signin-error").textContent = e.status === 401 ? "Sign-in refused: invalid API key." : `Sign-in failed: ${e.message}`;
    $("api-key").focus();
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("tenant-label").textContent = "Signed in";
  await refreshLists();
  state.poll = setInterval(refreshLists, 1500);
  openFromHash();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.hash = "";
  location.reload();
}

// --- slides and jobs -----------------------------------------------------------------------------------------
async function refreshLists() {
  let jobs, slides;
  try {
    [jobs, slides] = await Promise.all([apiJson("/jobs?limit=50"), apiJson("/slides?limit=50")]);
  } catch (e) {
    if (e.status === 401) signOut();
    return;
  }
  const ul = $("jobs");
  ul.replaceChildren(...jobs.items.map((j) => {
    const li = el("li", { "data-job-id": j.id, "data-state": j.state, class: state.job === j.id ? "current" : "" },
      el("button", { class: "link", type: "button", onclick: () => { location.hash = `job=${j.id}`; } },
        `Job ${j.id.slice(0, 8)}`),
      el("span", { class: "meta" }, `${j.state}${j.stage ? " · " + j.stage : ""} · ${Math.round(j.progress * 100)} %` +
        `${j.options && j.options.region ? " · region" : ""}`));
    if (j.state === "queued" || j.state === "running") {
      li.append(el("progress", { max: "1", value: String(j.progress), "aria-label": `Job ${j.id.slice(0, 8)} progress` }));
    }
    if (j.error) li.append(el("span", { class: "meta" }, `${j.error.code}: ${j.error.message}`));
    return li;
  }));
  if (!jobs.items.length) ul.replaceChildren(el("li", {}, "No jobs yet."));
  $("slides").replaceChildren(...slides.items.map((s) => {
    const dims = ((s.info || {}).level_dimensions || [])[0];
    const known = dims && dims[0] > 0 && dims[1] > 0;  // a PACS series is stored there, not here: no size to show
    return el("li", { "data-slide-id": s.id },
      s.size_bytes > 0 ? `${s.format.toUpperCase()} · ${(s.size_bytes / 1e6).toFixed(1)} MB` : `${s.format.toUpperCase()} series`,
      el("span", { class: "meta" }, `${s.id.slice(0, 8)}${known ? ` · ${dims.join(" × ")} px` : " · in the PACS"}`));
  }));
  const open = state.open;  // a job opened before it succeeded: its results are shown once, when it has
  if (open && open.waiting && !isStale(open)) {
    const cur = jobs.items.find((j) => j.id === open.id);
    if (cur && cur.state === "succeeded") { open.waiting = false; showJob(open); }
  }
}

function upload() {
  const file = $("upload-file").files[0];
  if (!file) { $("upload-status").textContent = "Choose a slide file first."; return; }
  const form = new FormData();
  form.append("file", file, file.name);
  const xhr = new XMLHttpRequest();
  const bar = $("upload-progress");
  bar.hidden = false; bar.value = 0;
  $("upload-btn").disabled = true;
  $("upload-status").textContent = `Uploading ${file.name} …`;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
  xhr.onload = () => {
    $("upload-btn").disabled = false;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* empty */ }
    if (xhr.status >= 200 && xhr.status < 300) {
      bar.value = 100;
      $("upload-status").textContent = body.job ? "Uploaded; analysis queued." : "Uploaded (already stored).";
      if (body.job) location.hash = `job=${body.job.id}`;
      refreshLists();
    } else {
      $("upload-status").textContent = `Upload refused: ${(body.error && body.error.message) || xhr.status}`;
    }
  };
  xhr.onerror = () => { $("upload-btn").disabled = false; $("upload-status").textContent = "Upload failed (network)."; };
  xhr.open("POST", "/slides");
  xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
  xhr.send(form);
}

// --- one job -------------------------------------------------------------------------------------------------
function openFromHash() {
  const m = /job=([A-Za-z0-9_-]+)/.exec(location.hash);
  if (m) openJob(m[1]);
}

// Each opened job gets its own context. Opening another job aborts its requests (their signal) and removes what it
// put on the page, and every continuation checks that its context is still the open one before it touches the
// page: a slow answer about one job never lands on the job opened after it.
function closeJob() {
  const open = state.open;
  state.open = null; state.job = null; state.overlay = null;
  if (!open) return;
  open.ctl.abort();
  for (const ov of open.overlays) {
    if (ov.pending) continue;  // still being added: its success callback removes it (the job is stale by then)
    if (ov.item && state.viewer) state.viewer.world.removeItem(ov.item);
    URL.revokeObjectURL(ov.url);
  }
  open.overlays = [];
}

const isStale = (open) => state.open !== open;

async function openJob(id) {
  closeJob();
  const open = { id, ctl: new AbortController(), shown: false, waiting: false, overlays: [] };
  const signal = open.ctl.signal;
  state.open = open; state.job = id;
  for (const li of document.querySelectorAll("#jobs li[data-job-id]")) li.classList.toggle("current", li.dataset.jobId === id);
  $("job-error").textContent = "";
  clearResults();
  if (region.aboutJob) { $("region-status").textContent = ""; region.aboutJob = false; }  // it described the last job
  let job;
  try {
    job = await apiJson(`/jobs/${encodeURIComponent(id)}`, { signal });
  } catch (e) {
    if (isStale(open)) return;
    closeJob();
    $("job-error").textContent = e.status === 404 ? "Job not found: it does not exist or belongs to another account."
      : `Cannot open the job: ${e.message}`;
    if (state.viewer) state.viewer.close();
    state.slideId = null; state.slideOpen = false;
    regionReset(true);
    $("hover-info").textContent = "No slide open.";
    return;
  }
  if (isStale(open)) return;
  try {
    await openSlide(open, job.slide_id);
  } catch (e) {  // e.g. a slide that lives in a PACS: its results are still shown
    if (isStale(open)) return;
    state.slideOpen = false; state.slideId = null;
    regionReset(true);  // a region drawn on another slide must not be sent for this one
    if (state.viewer) state.viewer.close();
    $("hover-info").textContent = `The slide cannot be shown here: ${e.message}`;
  }
  if (isStale(open)) return;
  if (job.state === "succeeded") await showJob(open);
  else {
    open.waiting = true;  // refreshLists shows the results when the job succeeds
    $("hover-info").textContent = `Job ${job.state}${job.error ? ": " + job.error.message : ""}; results appear when it succeeds.`;
  }
}

async function openSlide(open, slideId) {
  const other = slideId !== state.slideId;  // a region belongs to the slide it was drawn on
  state.slideId = slideId; state.slideOpen = false;
  regionReset(other);
  const dz = await apiJson(`/slides/${encodeURIComponent(slideId)}/dzi`, { signal: open.ctl.signal });
  if (isStale(open)) return;
  const source = { width: dz.width, height: dz.height, tileSize: dz.tileSize, tileOverlap: dz.tileOverlap,
    minLevel: dz.minLevel, maxLevel: dz.maxLevel,
    getTileUrl: (l, x, y) => dz.tiles.replace("{level}", l).replace("{col}", x).replace("{row}", y) };
  if (!state.viewer) {
    state.viewer = OpenSeadragon({ element: $("viewer"), prefixUrl: "/ui/static/vendor/openseadragon/images/",
      loadTilesWithAjax: true, ajaxHeaders: { Authorization: `Bearer ${state.key}` }, showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT", crossOriginPolicy: false, maxZoomPixelRatio: 2, gestureSettingsMouse: { clickToZoom: false } });
    new OpenSeadragon.MouseTracker({ element: state.viewer.canvas, moveHandler: onHover }).setTracking(true);
    regionWire(state.viewer);
  }
  state.viewer.open(source);
  state.slideOpen = true;
  $("region-draw").disabled = false;
  $("hover-info").textContent = "Slide loaded.";
}

async function showJob(open) {
  if (open.shown || isStale(open)) return;  // once per opened job
  open.shown = true;
  const id = open.id, signal = open.ctl.signal;
  let job, result;
  try {
    [job, result] = await Promise.all([apiJson(`/jobs/${encodeURIComponent(id)}`, { signal }),
      apiJson(`/jobs/${encodeURIComponent(id)}/result`, { signal })]);
  } catch (e) {
    if (!isStale(open)) $("job-error").textContent = `Cannot load the results: ${e.message}`;
    return;
  }
  if (isStale(open)) return;
  renderResults(id, result, job.links);
  if (!state.slideOpen) return;  // results only (the reason is already on the page)
  try {
    const fc = await apiJson(`/jobs/${encodeURIComponent(id)}/annotations.geojson`, { signal });
    if (isStale(open)) return;
    indexPatches(fc);
    const roi = fc.features.find((f) => f.properties.objectType === "annotation" && f.properties.name === "Region of interest");
    if (roi) {
      regionShow(roi.geometry);
      $("region-status").textContent = `Job ${id.slice(0, 8)} analysed only the outlined region.`;
      region.aboutJob = true;
    } else if (region.aboutJob) {  // that line described the region job opened before, not this one
      $("region-status").textContent = "";
      region.aboutJob = false;
    }
    await loadOverlay(open);
    if (isStale(open)) return;
    $("hover-info").textContent = "Hover a patch to see its attention and scores.";
  } catch (e) {
    if (isStale(open)) return;
    $("hover-info").textContent = `No per-patch scores for this job (${e.message}).`;
  }
}

// --- heatmap overlay and hover -------------------------------------------------------------------------------
// The heatmap is a blob URL that OpenSeadragon reads its one tile from: it stays valid while the overlay is on the
// slide and is revoked when the overlay is removed (another job opened).
async function loadOverlay(open) {
  const blob = await (await api(`/jobs/${encodeURIComponent(open.id)}/heatmap`, { signal: open.ctl.signal })).blob();
  if (isStale(open)) return;
  const ov = { url: URL.createObjectURL(blob), item: null, pending: true };
  open.overlays.push(ov);
  const opacity = $("overlay-opacity").value / 100;
  const settled = () => { ov.pending = false; if (isStale(open)) URL.revokeObjectURL(ov.url); };
  state.viewer.addTiledImage({ tileSource: { type: "image", url: ov.url, buildPyramid: false },
    x: 0, y: 0, width: 1, opacity, loadTilesWithAjax: false,
    success: (ev) => {
      settled();
      if (isStale(open)) { state.viewer.world.removeItem(ev.item); return; }  // another job opened meanwhile
      ov.item = ev.item; state.overlay = ev.item;
      $("overlay-toggle").checked = true; $("viewer").dataset.overlay = "on";
    },
    error: settled });
  $("overlay-toggle").disabled = false; $("overlay-opacity").disabled = false;
}

function setOverlay() {  // every heatmap of the open job (one), never another job's
  const items = state.open ? state.open.overlays.map((ov) => ov.item).filter(Boolean) : [];
  if (!items.length) return;
  const on = $("overlay-toggle").checked;
  for (const item of items) item.setOpacity(on ? $("overlay-opacity").value / 100 : 0);
  $("viewer").dataset.overlay = on ? "on" : "off";
}

function indexPatches(fc) {
  const m = fc.mstar || {};
  const step = m.step_level0 || m.patch_size_level0;
  const cells = new Map();
  for (const f of fc.features) {
    if (f.properties.objectType !== "detection") continue;
    const [x, y] = f.geometry.coordinates[0][0];
    cells.set(`${Math.round(x / step)},${Math.round(y / step)}`, { x, y, props: f.properties });
  }
  state.patches = { step, size: m.patch_size_level0, cells };
}

function onHover(ev) {
  if (!state.patches || !state.viewer.world.getItemCount()) return;
  const p = state.viewer.world.getItemAt(0).viewerElementToImageCoordinates(ev.position);
  const { step, size, cells } = state.patches;
  let hit = null;
  for (const [dx, dy] of [[0, 0], [-1, 0], [0, -1], [-1, -1]]) {
    const c = cells.get(`${Math.floor(p.x / step) + dx},${Math.floor(p.y / step) + dy}`);
    if (c && p.x >= c.x && p.x < c.x + size && p.y >= c.y && p.y < c.y + size) { hit = c; break; }
  }
  if (!hit) { $("hover-info").textContent = `(${Math.round(p.x)}, ${Math.round(p.y)}) px: not analysed`; return; }
  const ms = hit.props.measurements;
  const parts = Object.entries(ms).filter(([k]) => k !== "Patch index")
    .map(([k, v]) => `${k} ${Number(v).toFixed(3)}`);
  const cls = hit.props.classification ? ` · most likely ${hit.props.classification.name}` : "";
  $("hover-info").textContent = `Patch at (${hit.x}, ${hit.y})${cls}: ${parts.join(" · ")}`;
}

// --- results panel -------------------------------------------------------------------------------------------
function clearResults() {
  for (const id of ["classification", "survival", "zeroshot", "report", "downloads", "result-notice"]) $(id).replaceChildren();
  $("overlay-toggle").disabled = true; $("overlay-opacity").disabled = true; $("overlay-toggle").checked = false;
  delete $("viewer").dataset.overlay;  // until this job's heatmap is on the slide
  state.patches = null;
}

function fill(p) {
  const f = el("span", { class: "fill" });
  f.style.display = "block";
  f.style.width = `${(p * 100).toFixed(1)}%`; // CSSOM, allowed by the page's CSP (style attributes are not)
  return f;
}

function bars(container, probs, wide = false) {  // wide: labels are sentences (prompts), on a row of their own
  const entries = Object.entries(probs).sort((a, b) => b[1] - a[1]);
  container.append(...entries.map(([label, p], i) => el("div", { class: `bar${i === 0 ? " top" : ""}${wide ? " wide" : ""}`, role: "img",
    "aria-label": `${label} ${(p * 100).toFixed(1)} percent` },
  el("span", {}, label), el("span", { class: "track" }, fill(p)),
  el("span", {}, `${(p * 100).toFixed(1)} %`))));
}

function survivalSvg(s) {
  const curve = s.survival, edges = s.bin_edges || curve.map((_, i) => i);
  const W = 290, H = 120, L = 30, B = 20;
  const tmax = edges[edges.length - 1] || 1;
  const X = (t) => L + ((W - L - 6) * t) / tmax, Y = (v) => 6 + (H - B - 6) * (1 - v);
  let d = `M${X(edges[0])},${Y(1)}`;
  curve.forEach((v, i) => { d += ` H${X(edges[i + 1] ?? tmax)} V${Y(v)}`; });
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Predicted survival curve; ${curve.map((v) => v.toFixed(2)).join(", ")}`);
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text) e.textContent = text; svg.append(e); };
  add("path", { d: `M${L},6 V${H - B} H${W - 6}`, stroke: "#4a5361", fill: "none" });
  add("path", { d, stroke: "#0b5cad", "stroke-width": 2, fill: "none" });
  add("text", { x: 2, y: 12 }, "1.0"); add("text", { x: 2, y: H - B }, "0");
  add("text", { x: L, y: H - 4 }, "time (bins)"); add("text", { x: W - 40, y: H - 4 }, tmax.toFixed(0));
  return svg;
}

function downloadButton(label, path, filename) {
  return el("li", {}, el("button", { class: "link", type: "button", "data-href": path, onclick: async () => {
    try {
      const blob = await (await api(path)).blob();
      const a = el("a", { href: URL.createObjectURL(blob), download: filename });
      document.body.append(a); a.click(); a.remove();
    } catch (e) { $("job-error").textContent = `Download failed: ${e.message}`; }
  } }, label));
}

function renderResults(id, r, links) {
  $("result-notice").textContent = r.notice || "";
  for (const [head, v] of Object.entries(r.classification || {})) {
    $("classification").append(el("p", {}, el("strong", {}, head), ": most likely ", el("strong", { class: "label" }, v.label)));
    bars($("classification"), v.probabilities);
  }
  if (!r.classification || !Object.keys(r.classification).length) $("classification").append("Not computed.");
  for (const [head, v] of Object.entries(r.survival || {})) {
    $("survival").append(el("p", {}, `${head}: risk `, el("strong", { class: "risk" }, Number(v.risk).toFixed(3)),
      " (higher means worse)"), survivalSvg(v));
  }
  if (!r.survival || !Object.keys(r.survival).length) $("survival").append("Not computed.");
  if (r.zeroshot && r.zeroshot.prompts) {
    $("zeroshot").append(el("p", {}, "Best match: ", el("strong", {}, r.zeroshot.best)));
    bars($("zeroshot"), Object.fromEntries(r.zeroshot.prompts.map((p) => [p.prompt, p.probability])), true);
  } else $("zeroshot").append("No prompts were given for this job.");
  if (r.report && r.report.available) {
    $("report").append(el("p", { class: "notice" }, r.report.notice || "AI-drafted text; a pathologist must review it."),
      el("blockquote", { id: "report-text" }, r.report.text));
  } else $("report").append(r.report ? r.report.reason || "No report." : "Not computed.");
  const base = `/jobs/${encodeURIComponent(id)}`;
  $("downloads").append(downloadButton("Result (JSON)", `${base}/result`, `${id}-result.json`),
    downloadButton("Features (HDF5)", `${base}/features`, `${id}-features.h5`),
    downloadButton("QuPath GeoJSON", `${base}/annotations.geojson`, `${id}.geojson`),
    downloadButton("Heatmap (PNG)", `${base}/heatmap`, `${id}-heatmap.png`));
  if (links && links.dicom) $("downloads").append(downloadButton("DICOM objects (ZIP)", links.dicom, `${id}-dicom.zip`));
}

// --- region of interest: drawn on the slide (or pasted as GeoJSON), then analysed alone ----------------------
// Vertices are kept in level-0 image pixels (the API's and QuPath's space) and drawn in an SVG layer that
// follows the viewport; the layer ignores the pointer, so panning and zooming work while drawing.
const SVG_NS = "http://www.w3.org/2000/svg";
// shown: the region of the finished job that is open, as polygons (each a list of rings: its outline, then its holes,
// without the closing vertex); points is then the first polygon's outline.
const region = { drawing: false, points: [], closed: false, shown: null, layer: null, aboutJob: false };

function regionWire(viewer) {
  region.layer = document.createElementNS(SVG_NS, "svg");
  region.layer.setAttribute("class", "roi-layer");
  region.layer.setAttribute("aria-hidden", "true");
  viewer.canvas.append(region.layer);
  viewer.addHandler("update-viewport", regionDraw);
  viewer.addHandler("canvas-click", (e) => {
    if (!region.drawing || !e.quick) return;  // a drag still pans
    e.preventDefaultAction = true;
    regionAdd(slideItem().viewerElementToImageCoordinates(e.position), e.position);
  });
  $("viewer").addEventListener("dblclick", (e) => {
    if (!region.drawing) return;
    e.preventDefault(); e.stopPropagation();
    regionClose();
  }, true);
  // Capture phase: the keys reach us before OpenSeadragon's own handlers on its canvas.
  $("viewer").addEventListener("keydown", (e) => {
    if (!region.drawing) return;
    const act = { Enter: regionClose, Escape: regionCancel, Backspace: () => { region.points.pop(); regionDraw(); } }[e.key];
    if (!act) return;
    e.preventDefault(); e.stopPropagation();
    act();
  }, true);
}

const slideItem = () => state.viewer.world.getItemAt(0);

function regionAdd(p, screen) {
  const last = region.points[region.points.length - 1];
  if (last) {  // the second click of a double-click lands on the first: not a new vertex
    const q = slideItem().imageToViewerElementCoordinates(new OpenSeadragon.Point(last[0], last[1]));
    if (Math.hypot(q.x - screen.x, q.y - screen.y) < 4) return;
  }
  region.points.push([Math.round(p.x), Math.round(p.y)]);
  $("region-status").textContent = `${region.points.length} point(s); double-click or Enter closes, Escape cancels.`;
  regionDraw();
}

function regionDraw() {
  const layer = region.layer;
  if (!layer || !state.viewer || !state.viewer.world.getItemCount()) return;
  const item = slideItem();
  const screen = ([x, y]) => item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  if (region.shown) {  // a job's region: one path per polygon, holes cut out (even-odd)
    layer.replaceChildren(...region.shown.map((rings) => {
      const path = document.createElementNS(SVG_NS, "path");
      path.setAttribute("d", rings.map((ring) => "M" + ring.map(screen)
        .map((q) => `${q.x.toFixed(1)},${q.y.toFixed(1)}`).join(" L") + " Z").join(" "));
      path.setAttribute("fill-rule", "evenodd");
      path.setAttribute("class", "roi closed");
      path.dataset.rings = String(rings.length);
      return path;
    }));
    return;
  }
  const pts = region.points.map(screen);
  const shape = document.createElementNS(SVG_NS, region.closed ? "polygon" : "polyline");
  shape.setAttribute("points", pts.map((q) => `${q.x.toFixed(1)},${q.y.toFixed(1)}`).join(" "));
  shape.setAttribute("class", region.closed ? "roi closed" : "roi");
  const dots = region.closed ? [] : pts.map((q) => {
    const c = document.createElementNS(SVG_NS, "circle");
    c.setAttribute("cx", q.x.toFixed(1)); c.setAttribute("cy", q.y.toFixed(1)); c.setAttribute("r", "4");
    c.setAttribute("class", "roi-vertex");
    return c;
  });
  layer.replaceChildren(shape, ...dots);
}

function regionSetDrawing(on) {
  region.drawing = on;
  $("region-draw").setAttribute("aria-pressed", String(on));
  $("region-draw").textContent = on ? "Stop drawing" : "Draw region";
  $("viewer").classList.toggle("drawing", on);
}

function regionStart() {
  if (region.drawing) { regionClose(); return; }
  region.points = []; region.closed = false; region.shown = null;
  regionSetDrawing(true);
  regionDraw();
  $("region-clear").disabled = false;
  $("region-status").textContent = "Click to add points; double-click or Enter closes, Escape cancels, Backspace undoes.";
  $("viewer").focus();
}

function regionClose() {
  if (region.points.length < 3) {
    $("region-status").textContent = `A region needs at least 3 points (${region.points.length} so far).`;
    return;
  }
  regionSetDrawing(false);
  region.closed = true;
  regionDraw();
  const ring = [...region.points, region.points[0]];
  $("region-geojson").value = JSON.stringify({ type: "Feature", geometry: { type: "Polygon", coordinates: [ring] },
    properties: { objectType: "annotation", name: "Region of interest" } });
  $("region-run").disabled = false;
  $("region-status").textContent = `Region closed (${region.points.length} points). Analyse it, or Clear.`;
}

function regionCancel() {
  regionSetDrawing(false);
  region.points = []; region.closed = false; region.shown = null;
  regionDraw();
  $("region-status").textContent = "Drawing cancelled.";
}

function regionShow(geometry) {  // the region a finished job was limited to: every polygon, holes included
  const polygons = geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates];
  region.shown = polygons.map((rings) => rings.map((ring) => ring.slice(0, -1).map(([x, y]) => [x, y])))
    .filter((rings) => rings.length && rings[0].length >= 3);
  region.points = region.shown.length ? region.shown[0][0] : [];
  region.closed = true;
  regionDraw();
}

function regionReset(forget) {  // forget: another slide (or none) is opened, so the pasted/drawn region goes too
  regionSetDrawing(false);
  region.points = []; region.closed = false; region.shown = null;
  if (region.layer) region.layer.replaceChildren();
  $("region-draw").disabled = true;
  if (!forget) return;
  $("region-geojson").value = "";
  $("region-run").disabled = true; $("region-clear").disabled = true;
  $("region-status").textContent = "";
}

async function regionRun() {
  let geojson;
  try {
    geojson = JSON.parse($("region-geojson").value);
  } catch (e) {
    $("region-status").textContent = `The region is not valid JSON: ${e.message}`;
    return;
  }
  if (!state.slideId) { $("region-status").textContent = "Open a job first: the region applies to its slide."; return; }
  $("region-run").disabled = true;
  try {
    const job = await apiJson(`/slides/${encodeURIComponent(state.slideId)}/analyses`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ region: geojson }) });
    $("region-status").textContent = `Region analysis queued (job ${job.id.slice(0, 8)}).`;
    region.aboutJob = false;  // the line is about the new job now: opening it keeps it
    location.hash = `job=${job.id}`;
    refreshLists();
  } catch (e) {
    $("region-status").textContent = `Region refused: ${e.message}`;
  } finally {
    $("region-run").disabled = !$("region-geojson").value.trim();
  }
}

// --- wiring --------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("api-key").value.trim()); });
  $("signout").addEventListener("click", signOut);
  $("upload-btn").addEventListener("click", upload);
  $("overlay-toggle").addEventListener("change", setOverlay);
  $("overlay-opacity").addEventListener("input", setOverlay);
  $("region-draw").addEventListener("click", regionStart);
  $("region-run").addEventListener("click", regionRun);
  $("region-clear").addEventListener("click", () => { regionCancel(); $("region-geojson").value = "";
    $("region-run").disabled = true; $("region-clear").disabled = true; $("region-status").textContent = "Region cleared."; });
  $("region-geojson").addEventListener("input", () => {
    const has = Boolean($("region-geojson").value.trim());
    $("region-run").disabled = !has; $("region-clear").disabled = !has; });
  window.addEventListener("hashchange", () => { if (state.key) openFromHash(); });
  if (state.key) signIn(state.key);
});
