"""Batches through the HTTP gateway (`mstar submit --server URL`), for machines without database access.

Each slide is uploaded with `POST /slides` (which queues its analysis; a DICOM WSI folder goes as one ZIP of its
series, checked here first; an `s3://` line goes as the `source` field and the server copies the object); the
batch itself is a JSON record on this machine (`~/.mstar/batches/<id>.json`) mapping manifest lines to job ids,
rewritten atomically after each upload so an interrupted submission resumes where it stopped. Status and results
come from `GET /jobs/{id}` and `GET /jobs/{id}/features`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.atomic import atomic_path
from service.batch import _SAFE, default_batch_id, parse_manifest, write_summary
from service.errors import InvalidParameterError, MstarError
from service.ingest import series as dicom_series

TERMINAL = ("succeeded", "failed", "canceled")
# refusals that say nothing about a line: the submit stops, and the batch's record stays as it was
_STOP = {"unauthorized", "forbidden", "server_unreachable", "internal_error", "busy", "bundle_unavailable"}


class HttpBatch:
    def __init__(self, server: str, api_key: str | None, state_dir: str | Path | None = None) -> None:
        if not api_key:
            raise InvalidParameterError("--server needs an API key (--api-key or MSTAR_API_KEY)")
        self.server = server.rstrip("/")
        self.client = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(30.0, write=600.0),
        )
        self.state_dir = Path(state_dir) if state_dir else Path.home() / ".mstar" / "batches"
        # the key's fingerprint (not the key): a batch's record belongs to the key (tenant) that submitted it
        self.key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]

    def _path(self, batch_id: str) -> Path:
        return self.state_dir / f"{batch_id}.json"

    def _load(self, batch_id: str) -> dict:
        p = self._path(batch_id)
        if not p.is_file():
            raise InvalidParameterError(f"no batch {batch_id} in {self.state_dir}")
        rec = json.loads(p.read_text())
        if rec.setdefault("key_id", self.key_id) != self.key_id:
            # another key (another tenant) sees none of this batch's jobs: every line read `failed`, its slides
            # were uploaded again into that tenant, and the record of the finished batch was overwritten
            raise InvalidParameterError(
                f"batch {batch_id} was submitted with another API key: use that key, or name a new batch (--batch-id)"
            )
        return rec

    def _save(self, rec: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(rec["batch_id"])) as tmp:
            tmp.write_text(json.dumps(rec, indent=1))

    def _job(self, job_id: str) -> dict:
        r = self._call("GET", f"/jobs/{job_id}")
        if r.status_code == 404:  # deleted (with its slide): the line failed, and a resubmission runs it again
            return {"state": "failed", "error": {"code": "job_not_found", "message": "the job no longer exists"}}
        if r.status_code != 200:  # a refused key or a server in trouble says nothing about the job: stop
            _raise(r, f"GET /jobs/{job_id}")
        return r.json()

    def _call(self, method: str, url: str, **kwargs) -> httpx.Response:
        """A request; an unreachable server is one clear error, not a traceback."""
        try:
            return self.client.request(method, url, **kwargs)
        except httpx.HTTPError as err:
            exc = MstarError(f"cannot reach {self.server} ({type(err).__name__}); the batch record is unchanged")
            exc.code = "server_unreachable"
            raise exc from None

    def submit(self, manifest: str | Path, *, batch_id: str | None = None) -> dict:
        rows = parse_manifest(manifest)
        batch_id = batch_id or default_batch_id(self.server, manifest)
        if self._path(batch_id).is_file():
            rec = self._load(batch_id)
        else:
            rec = {
                "batch_id": batch_id,
                "server": self.server,
                "manifest": str(Path(manifest).resolve()),
                "key_id": self.key_id,
                "items": {},
            }
        out = {"batch_id": batch_id, "queued": 0, "skipped_done": 0, "in_flight": 0, "failed_ingest": 0}
        for row in rows:
            item = rec["items"].get(row.source)
            if item and item.get("job_id"):
                state = self._job(item["job_id"])["state"]
                if state == "succeeded":
                    out["skipped_done"] += 1
                    continue
                if state in ("queued", "running"):
                    out["in_flight"] += 1
                    continue
            item = {
                "idx": item["idx"] if item else len(rec["items"]),
                "name": row.name,
                "job_id": None,
                "error_code": None,
                "reason": None,
                "meta": dict(row.meta or {}),
            }
            try:
                item["job_id"] = self._upload(row.source, row.mpp_override, row.rna)
                out["queued"] += 1
            except MstarError as err:
                if err.code in _STOP:  # about the key or the server, not this line: keep the record as it is
                    raise
                item["error_code"], item["reason"] = err.code, str(err)
                out["failed_ingest"] += 1
            rec["items"][row.source] = item
            self._save(rec)
        self._save(rec)
        return out

    def _upload(self, source: str, mpp: float | None, rna: str | None = None) -> str:
        if source.startswith("s3://"):  # the server copies the object itself (its S3 store's credentials)
            return self._post(None, None, mpp, source=source, rna=rna)
        path = Path(source)
        if path.is_dir():
            return self._upload_series(path, mpp, rna)
        if not path.is_file():
            raise InvalidParameterError(f"{source}: --server batches take local files, DICOM folders and s3:// objects")
        with path.open("rb") as fh:
            return self._post(path.name, fh, mpp, rna=rna)

    def _upload_series(self, folder: Path, mpp: float | None, rna: str | None = None) -> str:
        """A DICOM WSI folder: checked here (one series), then sent as one uncompressed ZIP, which `POST /slides`
        unpacks and checks again; the server's upload limit applies to the ZIP."""
        series = dicom_series.collect(folder, max_bytes=1 << 62)
        with tempfile.TemporaryDirectory(prefix="mstar-series-") as tmp:
            archive = dicom_series.zip_series(series, Path(tmp) / "series.zip")
            with archive.open("rb") as fh:
                return self._post(f"{folder.name}.zip", fh, mpp, rna=rna)

    def _post(
        self, name: str | None, fh, mpp: float | None, *, source: str | None = None, rna: str | None = None
    ) -> str:
        """Upload (or copy) the slide; with an RNA file, store it first, then analyse it with the profile."""
        data = {"analyze": "false" if rna else "true"}
        if mpp is not None:
            data["mpp_override"] = str(mpp)
        if source is not None:
            data["source"] = source
            # multipart, like a file upload: an empty files= makes httpx send a url-encoded form instead
            files = {k: (None, v) for k, v in data.items()}
            r = self._call("POST", "/slides", files=files)
        else:
            r = self._call("POST", "/slides", files={"file": (name, fh)}, data=data)
        if r.status_code not in ((200, 201) if rna else (202,)):
            _raise(r, "upload")
        if rna:
            return self._analyse_with_rna(r.json()["id"], rna, mpp)
        return r.json()["job"]["id"]

    def _analyse_with_rna(self, slide_id: str, rna: str, mpp: float | None) -> str:
        """`POST /slides/{id}/analyses` with the line's RNA file as the multipart part `rna`."""
        request = json.dumps({"mpp_override": mpp} if mpp is not None else {})
        with open(rna, "rb") as fh:
            r = self.client.post(
                f"/slides/{slide_id}/analyses", files={"rna": (Path(rna).name, fh)}, data={"request": request}
            )
        if r.status_code != 202:
            _raise(r, "analysis")
        return r.json()["id"]

    def status(self, batch_id: str) -> list[dict]:
        rec = self._load(batch_id)
        items = []
        for source, it in sorted(rec["items"].items(), key=lambda kv: kv[1]["idx"]):
            row = {
                "idx": it["idx"],
                "name": it["name"],
                "source": source,
                "job_id": it.get("job_id"),
                "state": "failed",
                "error_code": it.get("error_code"),
                "reason": it.get("reason"),
                "attempts": 0,
            }
            if it.get("job_id"):
                job = self._job(it["job_id"])
                err = job.get("error") or {}
                row.update(
                    state=job["state"],
                    error_code=err.get("code"),
                    reason=err.get("message"),
                    attempts=job.get("attempts", 0),
                    slide_id=job.get("slide_id"),
                    seconds=_seconds(job),
                )
            row["meta"] = it.get("meta") or {}
            items.append(row)
        return items

    def follow(self, batch_id: str, *, poll_s: float = 1.0) -> dict[str, int]:
        while True:
            items = self.status(batch_id)
            counts = {
                s: sum(1 for i in items if i["state"] == s)
                for s in ("queued", "running", "succeeded", "failed", "canceled")
            }
            counts["remaining"] = counts["queued"] + counts["running"]
            print(
                f"\rdone {counts['succeeded']}  failed {counts['failed'] + counts['canceled']}  "
                f"remaining {counts['remaining']}",
                end="",
                file=sys.stderr,
                flush=True,
            )
            if counts["remaining"] == 0:
                print(file=sys.stderr)
                return counts
            time.sleep(poll_s)

    def results(self, batch_id: str, out_dir: Path) -> Path:
        """`features/` and the summary table as `--broker` batches write them (`service.batch.write_summary`):
        the same columns, manifest metadata as `meta_<column>`, and a Parquet copy where pyarrow is installed."""
        items = self.status(batch_id)
        (out_dir / "features").mkdir(parents=True, exist_ok=True)
        records = []
        for it in items:
            features, patches = "", ""
            if it["state"] == "succeeded":
                dest = out_dir / "features" / f"{it['idx']:05d}_{_SAFE.sub('_', it['name'])[:80]}.h5"
                with self.client.stream("GET", f"/jobs/{it['job_id']}/features") as r:
                    if r.status_code == 200:
                        tmp = dest.with_suffix(".h5.part")
                        with tmp.open("wb") as fh:
                            for chunk in r.iter_bytes(1 << 20):
                                fh.write(chunk)
                        tmp.replace(dest)
                        features = str(dest.relative_to(out_dir))
                result = self._call("GET", f"/jobs/{it['job_id']}/result")
                if result.status_code == 200:  # as `BatchService.patches` reads it
                    doc = result.json()
                    patches = (doc.get("tiling") or {}).get("patches", doc.get("n_patches", ""))
            records.append(
                {
                    "idx": it["idx"],
                    "name": it["name"],
                    "source": it["source"],
                    "state": it["state"],
                    "error_code": it["error_code"] or "",
                    "reason": it["reason"] or "",
                    "attempts": it["attempts"],
                    "n_patches": patches,
                    "seconds": "" if it.get("seconds") is None else it["seconds"],
                    "features": features,
                    "job_id": it["job_id"] or "",
                    "slide_id": it.get("slide_id") or "",
                    **{f"meta_{k}": v for k, v in it["meta"].items()},
                }
            )
        return write_summary(out_dir, records)


def _seconds(job: dict) -> float | None:
    """Wall seconds of a finished job, from its ISO timestamps."""
    from datetime import datetime

    try:
        started, finished = job.get("started_at"), job.get("finished_at")
        if not started or not finished:
            return None
        delta = datetime.fromisoformat(finished.replace("Z", "+00:00")) - datetime.fromisoformat(
            started.replace("Z", "+00:00")
        )
        return round(delta.total_seconds(), 3)
    except (TypeError, ValueError):
        return None


def _raise(r, what: str) -> None:
    """The server's refusal as a typed error (its code and reason)."""
    try:
        err = r.json().get("error") or {}
    except ValueError:
        err = {}
    exc = MstarError(err.get("message") or f"{what} answered HTTP {r.status_code}")
    exc.code = err.get("code") or f"http_{r.status_code}"
    raise exc
