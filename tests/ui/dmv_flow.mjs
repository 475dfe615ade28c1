// Drives tests/ui/dmv_page.html in Debian's headless Chromium: opens the study in dicom-microscopy-viewer and
// prints one JSON line (what the viewer loaded, every frame response, page errors) for tests/test_pacs.py.
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(join(process.cwd(), "ui", "package.json")); // run from the repository root
const { chromium } = require("playwright-core");

const [url, args] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage();
  const errors = [];
  const frames = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("response", (r) => {
    if (r.url().includes("/frames/")) frames.push({ url: new URL(r.url()).pathname, status: r.status() });
  });
  await page.goto(url);
  let loaded = null;
  try {
    const uids = JSON.parse(args);
    loaded = await page.evaluate((a) => openStudy(...a), uids);
    // the viewer fetches tiles as it draws: wait (30 s at most) until the slide's and the SEG's frames came
    const seen = (uid) => frames.some((f) => f.url.includes(`/series/${uid}/`));
    for (let t = 0; t < 60 && !(seen(uids[1]) && seen(uids[2])); t++) await page.waitForTimeout(500);
    await page.waitForTimeout(1000);
  } catch (e) {
    errors.push(String(e.message || e));
  }
  console.log(JSON.stringify({ loaded, frames, errors }));
} finally {
  await browser.close();
}
