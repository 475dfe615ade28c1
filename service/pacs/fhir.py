"""A finished analysis as an HL7 FHIR DiagnosticReport for the LIS, validated with `fhir.resources`.

FHIR R4 on the wire; the models are `fhir.resources.R4B` (R4B changed nothing in DiagnosticReport,
Observation or Device that this report uses). The report is `preliminary`: an AI draft that a pathologist
must verify. Observations (class, probabilities, risk) and the Device (bundle name, version, model
checksums) are contained resources, so the report stands alone; the study is referenced by its UID.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("mstar.pacs")
CODE_SYSTEM = "urn:mstar:codes"
DRAFT = "AI-generated draft (research use): not verified; a pathologist must review and sign any report."


def _obs(oid: str, code: str, display: str, *, value: float | None = None, concept: str | None = None) -> dict:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": {"coding": [{"system": CODE_SYSTEM, "code": code, "display": display}], "text": display},
        "device": {"reference": "#device"},
    }
    if value is not None:
        obs["valueQuantity"] = {
            "value": round(float(value), 6),
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
    if concept is not None:
        obs["valueCodeableConcept"] = {
            "coding": [{"system": CODE_SYSTEM, "code": concept, "display": concept}],
            "text": concept,
        }
    return obs


def diagnostic_report(job_id: str, result: dict, *, study_uid: str | None, bundle_version: str | None) -> dict:
    """The report as FHIR JSON (validated); raises `ValueError` when the models reject it."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    bundle = result.get("bundle") or {}
    models = bundle.get("models") or {}
    device = {
        "resourceType": "Device",
        "id": "device",
        "manufacturer": "mSTAR",
        "deviceName": [{"name": str(bundle.get("name") or "mSTAR"), "type": "model-name"}],
        "version": [{"value": str(bundle_version or "unversioned")}]
        + [
            {"type": {"text": f"{n} sha256"}, "value": f"{m.get('version')} {m.get('sha256')}"}
            for n, m in sorted(models.items())
        ],
    }
    observations: list[dict] = []
    for head, out in sorted((result.get("classification") or {}).items()):
        if out.get("label") is not None:
            observations.append(
                _obs(f"class-{head}", f"class-{head}", f"Predicted class ({head})", concept=str(out["label"]))
            )
        for label, p in (out.get("probabilities") or {}).items() if isinstance(out.get("probabilities"), dict) else []:
            observations.append(
                _obs(f"p-{head}-{label}", f"p-{head}-{label}", f"Probability of {label} ({head})", value=p)
            )
    for head, out in sorted((result.get("survival") or {}).items()):
        risk = out.get("risk")
        if risk is not None:
            value = risk[0] if isinstance(risk, list) else risk
            observations.append(_obs(f"risk-{head}", f"risk-{head}", f"Survival risk score ({head})", value=value))
    for o in observations:  # FHIR ids: letters, digits, '-' and '.'
        o["id"] = "".join(c if c.isalnum() or c in "-." else "-" for c in o["id"])[:64]
    text = (result.get("report") or {}).get("text")
    conclusion = f"{DRAFT}\n\n{text}" if text else DRAFT
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": job_id,
        "identifier": [{"system": "urn:mstar:job", "value": job_id}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "PAT",
                        "display": "Pathology (gross & histopath, not surgical)",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": CODE_SYSTEM, "code": "wsi-ai-analysis", "display": "Whole-slide image AI analysis"}],
            "text": "Whole-slide image AI analysis",
        },
        "contained": [device, *observations],
        "performer": [{"reference": "#device", "display": "mSTAR (AI)"}],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": conclusion,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "title": "AI draft report (unverified)",
                "data": _b64(conclusion),
            }
        ],
    }
    if study_uid:
        report["imagingStudy"] = [
            {
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
                "display": "source slide study",
            }
        ]
    if result.get("notice"):
        report["conclusion"] += f"\n\n{result['notice']}"
    return json.loads(DiagnosticReport.model_validate(report).model_dump_json(exclude_none=True))


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def post_report(endpoint: Any, report: dict) -> int:
    """POST to the configured FHIR endpoint with retries; returns the final HTTP status (raises after the last
    try). A conditional create (`If-None-Exist` on the report's job identifier): a retry after an answer that
    was lost, or a redelivered job, finds the report the LIS already has instead of filing it twice."""
    import httpx

    headers = {"Content-Type": "application/fhir+json"}
    ident = next(iter(report.get("identifier") or []), None)
    if ident and ident.get("system") and ident.get("value"):
        headers["If-None-Exist"] = f"identifier={ident['system']}|{ident['value']}"
    if endpoint.token is not None:
        headers["Authorization"] = f"Bearer {endpoint.token.get_secret_value()}"
    delay = endpoint.backoff_s
    for attempt in range(1, endpoint.attempts + 1):
        try:
            r = httpx.post(
                endpoint.url.rstrip("/") + "/DiagnosticReport",
                json=report,
                headers=headers,
                timeout=endpoint.timeout_s,
                verify=endpoint.verify_tls,
            )
            if r.status_code < 500 and r.status_code != 429:
                r.raise_for_status()
                return r.status_code
            failure = f"HTTP {r.status_code}"
        except httpx.HTTPStatusError:
            raise
        except httpx.HTTPError as err:
            failure = type(err).__name__
        if attempt == endpoint.attempts:
            raise RuntimeError(f"FHIR endpoint failed after {attempt} tries ({failure})")
        log.warning("FHIR POST try %d failed (%s); retrying in %.1f s", attempt, failure, delay)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")
