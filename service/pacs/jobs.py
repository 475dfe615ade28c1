"""PACS analyses as ordinary jobs: a Slide row whose format is `pacs` (no blob; its info holds the server
name and the study/series UIDs, never patient data), resolved by the job runner to a `PacsSlideSource`, and
a post-pipeline step that writes the DICOM results back. Everything else (states, progress, webhooks,
tenants, Celery or embedded) is the normal job machinery.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from service.errors import InvalidParameterError, MstarError
from service.pacs.config import PacsSettings
from service.pacs.source import PacsSlideSource

PACS_FORMAT = "pacs"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: str | None, what: str) -> None:
    if value is not None and (len(value) > 64 or not UID_RE.match(value)):
        raise InvalidParameterError(f"{what} is not a DICOM UID (digits and dots, at most 64 characters)")


def slide_key(server: str, study_uid: str, series_uid: str | None) -> str:
    """The Slide row's `sha256` for a PACS slide: its identity is where it lives, not its bytes."""
    return hashlib.sha256(f"pacs:{server}:{study_uid}:{series_uid or ''}".encode()).hexdigest()


def slide_info(server: str, study_uid: str, series_uid: str | None) -> dict:
    return {"source": "dicomweb", "pacs": server, "study_uid": study_uid, "series_uid": series_uid}


def job_key(server: str, study_uid: str, series_uid: str | None, options: dict) -> str:
    """Idempotency key of an analysis: one job per (server, study, series, options in canonical form), whoever
    triggers it (API client, watcher, Orthanc callback)."""
    from service.pacs.writers import analysis_options

    raw = json.dumps([server, study_uid, series_uid or "", analysis_options(options)], sort_keys=True)
    return "pacs-" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def source_for(info: dict, tenant: str) -> PacsSlideSource:
    server = PacsSettings().server(tenant, str(info.get("pacs")))
    return PacsSlideSource(server, str(info["study_uid"]), info.get("series_uid"))


def bundle_version(bundle_dir: Path | None) -> str | None:
    """The served bundle's version as the gateway reports it (first 12 hex of the manifest's sha256)."""
    if bundle_dir is None:
        return None
    from service.inference.bundle import MANIFEST_NAME

    path = Path(bundle_dir) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


class FhirDeliveryError(MstarError):
    code = "fhir_delivery_failed"
    http_status = 502


def after_pipeline(
    source: PacsSlideSource, out_dir: Path, options: dict, bundle_dir: Path | None, job_id: str = ""
) -> dict:
    """Write the DICOM objects next to the results and STOW them into the slide's study; then, when the
    tenant has a FHIR endpoint, POST the DiagnosticReport there (with retries)."""
    from service.pacs.writeback import write_back

    if source.series_uid is None:  # the pipeline resolved it; a fake pipeline may not have
        raise InvalidParameterError("the slide series was never resolved")
    version = bundle_version(bundle_dir)
    section = write_back(
        source.server,
        out_dir,
        study_uid=source.study_uid,
        series_uid=source.series_uid,
        options=options,
        bundle_version=version,
    )
    endpoint = PacsSettings().fhir_endpoint(source.server.tenant)
    if endpoint is not None:
        from service.pacs.fhir import diagnostic_report, post_report

        result = json.loads((out_dir / "result.json").read_text())
        report = diagnostic_report(job_id, result, study_uid=source.study_uid, bundle_version=version)
        try:
            post_report(endpoint, report)
        except Exception as err:
            raise FhirDeliveryError(f"the FHIR endpoint did not take the report ({err})") from err
    return section
