"""After the pipeline: the DICOM result objects written next to result.json (so `GET /jobs/{id}/dicom` serves
them) and stored into the slide's study over STOW-RS, with retries and backoff.

Idempotent end to end: the objects' UIDs come from (source series, bundle, options), so a retry, a second
trigger or a re-run stores the same instances again, which a PACS keeps once. Every stored instance is
checked back by QIDO-RS; a STOW that still fails (or leaves an object out) after its tries fails the job with
the reason, and the objects are never half-announced in result.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from service.atomic import atomic_path
from service.pacs.client import (
    PacsError,
    PacsStoreIncompleteError,
    PacsTimeoutError,
    PacsUnavailableError,
    _value,
    make_client,
    translate,
)
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


def _refused(response: Any) -> set[str]:
    """SOP instance UIDs a STOW-RS answer lists as failed (its FailedSOPSequence); a 2xx answer may carry them."""
    return {
        str(getattr(item, "ReferencedSOPInstanceUID", ""))
        for item in getattr(response, "FailedSOPSequence", None) or []
    }


def _kept(client: Any, server: PacsServer, study_uid: str, ds: Any) -> bool:
    """Whether QIDO-RS finds the instance in the study: the PACS kept it, whatever its STOW answer said."""
    sop = str(ds.SOPInstanceUID)
    try:
        found = client.search_for_instances(
            study_uid, str(ds.SeriesInstanceUID), search_filters={"SOPInstanceUID": sop}, fields=["00080018"]
        )
    except Exception as err:
        raise translate(err, server.name, f"QIDO-RS check of stored series {ds.SeriesInstanceUID}") from err
    return isinstance(found, list) and any(isinstance(i, dict) and _value(i, "00080018") == sop for i in found)


def _describe(ds: Any) -> str:
    from pydicom.uid import UID

    return f"{UID(str(ds.SOPClassUID)).name} {ds.SOPInstanceUID}"


def store_with_retry(client: Any, server: PacsServer, datasets: list, study_uid: str) -> None:
    """STOW-RS into `study_uid`, then QIDO-RS that the PACS keeps every instance (a PACS may list an object as
    failed, or drop a SOP class it does not support while answering 200). Transient failures (5xx, timeouts)
    and objects not kept are sent again with exponential backoff; a resend is harmless, the UIDs are fixed.
    DICOMweb has no transaction or delete, so objects kept before a final failure stay in the study: the error
    names what is missing, and a re-run stores only that (the rest is already there under the same UIDs)."""
    pending = list(datasets)
    delay = server.stow_backoff_s
    for attempt in range(1, server.stow_attempts + 1):
        try:
            response = client.store_instances(pending, study_instance_uid=study_uid)
        except Exception as err:
            failure = translate(err, server.name, f"STOW-RS into study {study_uid}")
            transient = isinstance(failure, PacsUnavailableError | PacsTimeoutError)
            if not transient:  # refused (401/403/404/4xx): retrying cannot help
                raise failure from err
            if attempt == server.stow_attempts:
                raise type(failure)(f"{failure} (after {attempt} tries)") from err
            reason = failure.code
        else:
            refused = _refused(response)
            pending = [
                ds for ds in pending if str(ds.SOPInstanceUID) in refused or not _kept(client, server, study_uid, ds)
            ]
            if not pending:
                return
            if attempt == server.stow_attempts:
                kept = len(datasets) - len(pending)
                raise PacsStoreIncompleteError(
                    f"PACS {server.name!r} kept {kept} of {len(datasets)} objects stored into study {study_uid} "
                    f"(after {attempt} tries); not kept: {'; '.join(_describe(ds) for ds in pending)}. "
                    "The kept ones carry fixed UIDs: a re-run stores only what is missing, nothing twice"
                )
            reason = f"{len(pending)} of {len(datasets)} objects not kept"
        log.warning("STOW-RS try %d/%d failed (%s); retrying in %.1f s", attempt, server.stow_attempts, reason, delay)
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
