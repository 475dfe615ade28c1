"""After the pipeline: the DICOM result objects written next to result.json (so `GET /jobs/{id}/dicom` serves
them) and stored into the slide's study over STOW-RS, with retries and backoff.

Idempotent end to end: the objects' UIDs come from (source series, bundle, options), so a retry, a second
trigger or a re-run stores the same instances again, which a PACS keeps once. A STOW that still fails after
its tries fails the job with the reason; the objects are never half-announced in result.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from service.atomic import atomic_path
from service.pacs.client import PacsError, PacsTimeoutError, PacsUnavailableError, make_client, translate
from service.pacs.config import PacsServer
from service.pacs.writers import Identity, build_objects, source_dataset

log = logging.getLogger("mstar.pacs")


def bundle_identity(result: dict, bundle_version: str | None) -> dict:
    b = result.get("bundle") or {}
    return {
        "name": b.get("name") or "unknown",
        "version": bundle_version or "unversioned",
        "models": b.get("models") or {},
    }


def _level0_instance(client: Any, server: str, study: str, series: str) -> dict:
    from service.pacs.client import find_slide_series

    found = find_slide_series(client, server, study, series)
    best = max(found.volume_instances, key=lambda i: int((i.get("00480006") or {}).get("Value", [0])[0] or 0))
    sop = best["00080018"]["Value"][0]
    try:
        meta = client.retrieve_instance_metadata(study, series, sop)
    except Exception as err:
        raise translate(err, server, f"metadata of instance {sop}") from err
    if not isinstance(meta, dict):
        raise PacsError(f"PACS {server!r}: instance metadata is not a DICOM JSON object")
    return meta


def store_with_retry(client: Any, server: PacsServer, datasets: list, study_uid: str) -> None:
    """STOW-RS into `study_uid`; transient failures are retried with exponential backoff."""
    delay = server.stow_backoff_s
    for attempt in range(1, server.stow_attempts + 1):
        try:
            client.store_instances(datasets, study_instance_uid=study_uid)
            return
        except Exception as err:
            failure = translate(err, server.name, f"STOW-RS into study {study_uid}")
            transient = isinstance(failure, PacsUnavailableError | PacsTimeoutError)
            if not transient:  # refused (401/403/404/4xx): retrying cannot help
                raise failure from err
            if attempt == server.stow_attempts:
                raise type(failure)(f"{failure} (after {attempt} tries)") from err
            log.warning(
                "STOW-RS try %d/%d failed (%s); retrying in %.1f s", attempt, server.stow_attempts, failure.code, delay
            )
            time.sleep(delay)
            delay *= 2


def write_back(
    server: PacsServer, out_dir: Path, *, study_uid: str, series_uid: str, options: dict, bundle_version: str | None
) -> dict:
    """Build the DICOM objects for the finished analysis in `out_dir`, store them into the study, and record
    their UIDs in result.json. Returns the `dicom` section it added."""
    result_path = out_dir / "result.json"
    result = json.loads(result_path.read_text())
    if result.get("status") != "analyzed":
        return {}
    bundle = bundle_identity(result, bundle_version)
    client, _ = make_client(server)
    src = source_dataset(_level0_instance(client, server.name, study_uid, series_uid))
    ident = Identity(study_uid, series_uid, bundle["name"], bundle["version"], options)
    objects, notes = build_objects(src, result, out_dir / "features.h5", bundle, ident, heatmap=server.heatmap)
    written = {}
    for name, ds in objects.items():
        with atomic_path(out_dir / name) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written[name] = {
            "sop_class_uid": str(ds.SOPClassUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "modality": str(ds.Modality),
        }
    section: dict[str, Any] = {"study_instance_uid": study_uid, "objects": written, "stored": False, "notes": notes}
    if server.write_results:
        store_with_retry(client, server, list(objects.values()), study_uid)
        section["stored"] = True
        section["pacs"] = server.name
    result["dicom"] = section
    with atomic_path(result_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return section
