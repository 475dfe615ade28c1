"""OpenAPI fragments shared by routers (documented error responses, the streamed upload body) and the
conditional-request check of immutable views (tiles, re-rendered results)."""

from __future__ import annotations

from fastapi import Request, Response

from service.api.schemas import ErrorBody

_DESCRIPTIONS = {
    400: "malformed request",
    401: "missing or invalid API key",
    403: "not allowed: an admin-only resource, or an upload `source` clients may not read",
    404: "no such object for this tenant",
    409: "the job is not in a state that allows this, or an upload contradicts the stored slide (µm/px)",
    413: "body too large (uploads: MSTAR_UPLOAD_MAX_BYTES; JSON bodies: 1 MiB)",
    415: "not multipart/form-data, or not a supported slide format",
    422: "invalid parameters, corrupt slide, slide without µm/px, or an Idempotency-Key reused with another request",
    429: "over this tenant's quota (concurrent uploads, queued jobs); see Retry-After",
    503: "not ready, or busy (too many uploads in progress; see Retry-After)",
    507: "the store has no space left (`storage_full`); nothing was stored",
}


def ERRORS(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the slide (SVS, NDPI, OME-TIFF, tiled TIFF, DICOM, PNG/JPEG); "
                            "exactly one of `file` and `source`",
                        },
                        "source": {
                            "type": "string",
                            "maxLength": 1024,
                            "example": "s3://bucket/cohort/slide.svs",
                            "description": "instead of `file`: an `s3://bucket/key` object the server copies into "
                            "its store (needs MSTAR_BLOB_URL=s3://...; read with the server's credentials), "
                            "then checks like an upload",
                        },
                        "analyze": {
                            "type": "boolean",
                            "default": True,
                            "description": "queue an analysis with default options",
                        },
                        "mpp_override": {
                            "type": "number",
                            "minimum": 0.05,
                            "maximum": 20,
                            "description": "µm/px when the slide carries none",
                        },
                    },
                }
            }
        },
    }
}


def not_modified(request: Request, etag: str, headers: dict[str, str]) -> Response | None:
    """A 304 when the request's If-None-Match names `etag` (or `*`), else None. Called only after the tenant
    and the parameters were checked, so a 304 never says more than a 200 would."""
    sent = request.headers.get("if-none-match")
    if sent is None:
        return None
    tags = {t.strip().removeprefix("W/") for t in sent.split(",")}
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers={"ETag": etag, **headers})
    return None
