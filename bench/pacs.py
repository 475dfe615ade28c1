"""The same slide analysed from a PACS over DICOMweb vs from local files, side by side in one run.

Run: `.venv/bin/python bench/pacs.py [--bundle DIR] [--repeats 3] [--json out.json]`

Converts the real CMU SVS to a DICOM WSI series with OrthancWSIDicomizer (Debian orthanc-wsi), starts a real
Orthanc with its DICOMweb plugin on a free loopback port (killed at the end), stores the series in it, then
runs `service.pipeline.run_analysis` alternately on the local DICOM folder and on the PACS source
(`PacsSlideSource`: QIDO discovery, WADO-RS frames), `--repeats` times each. Prints the median wall time of
each, their ratio, and the bytes fetched over DICOMweb against the series size on disk (tissue frames at
the read level plus a coarse level for the mask, never the whole series). Without `--bundle` the pipeline
stops after tiling (mask + grid), which is the part whose I/O differs; with one it also embeds every patch,
so the frames under tissue are fetched too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from services import dicomize, run_orthanc  # noqa: E402

from service.pacs.config import PacsServer  # noqa: E402
from service.pacs.source import PacsSlideSource  # noqa: E402
from service.pipeline import run_analysis  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="model bundle (default: tiling only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mstar-bench-pacs-"))
    try:
        files = dicomize(SLIDE, work / "series")
        local = work / "local"
        local.mkdir()
        for f in files:
            shutil.copy(f, local / f.name)
        series_bytes = sum(f.stat().st_size for f in files)
        import pydicom

        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        with run_orthanc() as orthanc:
            orthanc.upload(files)
            server = PacsServer(name="bench", tenant="bench", url=orthanc.url)
            local_s, web_s, fetched, requests_n, frames = [], [], [], [], []
            for i in range(args.repeats):
                dt, _ = _timed(lambda i=i: run_analysis(local, work / f"out-local-{i}", bundle_dir=args.bundle))
                local_s.append(dt)
                source = PacsSlideSource(server, study)
                dt, res = _timed(lambda i=i, s=source: run_analysis(s, work / f"out-web-{i}", bundle_dir=args.bundle))
                web_s.append(dt)
                fetched.append(res["source"]["bytes_fetched"])
                requests_n.append(res["source"]["requests"])
                frames.append((res["source"]["frames_fetched"], res["source"]["frames_in_series"]))
            patches = res["tiling"]["patches"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {
        "slide": SLIDE.name,
        "bundle": args.bundle,
        "patches": patches,
        "series_bytes": series_bytes,
        "local_s_median": round(statistics.median(local_s), 3),
        "dicomweb_s_median": round(statistics.median(web_s), 3),
        "time_ratio_dicomweb_over_local": round(statistics.median(web_s) / statistics.median(local_s), 2),
        "bytes_fetched": fetched[-1],
        "fetched_over_series": round(fetched[-1] / series_bytes, 3),
        "http_requests": requests_n[-1],
        "frames_fetched": frames[-1][0],
        "frames_in_series": frames[-1][1],
    }
    for k, v in row.items():
        print(f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
