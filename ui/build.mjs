// Copies the pinned npm dependencies the viewer uses into the Python package (service/api/ui/static/vendor),
// so the server needs no Node at run time. Run after `npm ci`: `npm run build` (or `make ui`).
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "..", "service", "api", "ui", "static", "vendor");
const osd = join(here, "node_modules", "openseadragon");
const version = JSON.parse(readFileSync(join(osd, "package.json"), "utf8")).version;

rmSync(vendor, { recursive: true, force: true });
mkdirSync(join(vendor, "openseadragon"), { recursive: true });
cpSync(join(osd, "build", "openseadragon", "openseadragon.min.js"), join(vendor, "openseadragon", "openseadragon.min.js"));
cpSync(join(osd, "build", "openseadragon", "images"), join(vendor, "openseadragon", "images"), { recursive: true });
cpSync(join(osd, "LICENSE.txt"), join(vendor, "openseadragon", "LICENSE.txt"));
writeFileSync(join(vendor, "VERSIONS.json"), JSON.stringify({ openseadragon: version }, null, 2) + "\n");
console.log(`vendor: openseadragon ${version} -> ${vendor}`);
