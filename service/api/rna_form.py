"""`POST /slides/{id}/analyses` as multipart/form-data: the RNA-Seq profile as a file, as researchers have it.

The part `rna` is the file (any format `rna_input.read_profile` reads: `Gene,Value` CSV/TSV, a GDC STAR
gene-counts table, a TCGA RSEM table); the optional part `request` holds the JSON body's other fields. The route
class turns such a request into the JSON request the endpoint already validates, with the file's bytes beside
it in `request.state.rna_file`, so both forms share one schema, one set of checks and one code path."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile

from service.errors import InvalidParameterError
from service.inference.rna_input import MAX_BYTES

FILE_PART, REQUEST_PART = "rna", "request"

OPENAPI = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILE_PART: {
                            "type": "string",
                            "format": "binary",
                            "description": "RNA-Seq profile: Gene,Value CSV/TSV, GDC STAR counts or TCGA RSEM",
                        },
                        REQUEST_PART: {"type": "string", "description": "the JSON body's fields (no `rna`)"},
                    },
                    "required": [FILE_PART],
                }
            }
        }
    }
}


# A profile posted as the body itself (text/csv, ...) would otherwise get FastAPI's "valid dictionary" 422
_WRONG_MEDIA = (
    "a {media} body is not accepted here: send the analysis request as application/json (an RNA profile as "
    "`rna: {{genes, values}}`), or multipart/form-data with the RNA-Seq profile file as the part `{part}`"
)


class RnaFormRoute(APIRoute):
    """A route that also takes multipart/form-data with an RNA profile file (see the module docstring).

    The route's own body cap (`max_body_size`) leaves room for a profile file; a JSON body keeps the app's JSON
    cap (`json_max`, 413 beyond it), so a large profile is sent as the file it already is."""

    json_max: int = 1 << 20

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        json_max = self.json_max

        async def route(request: Request) -> Response:
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media == "multipart/form-data":
                request = await _as_json(request)
            else:
                declared = request.headers.get("content-length", "")
                if (declared.isdigit() and int(declared) > json_max) or len(body := await request.body()) > json_max:
                    raise HTTPException(status_code=413)
                if body and media not in ("", "application/json") and not media.endswith("+json"):
                    raise InvalidParameterError(_WRONG_MEDIA.format(media=media, part=FILE_PART))
            return await handler(request)

        return route


async def _as_json(request: Request) -> Request:
    async with request.form(max_files=1, max_fields=1, max_part_size=1 << 20) as form:
        unknown = sorted(set(form) - {FILE_PART, REQUEST_PART})
        if unknown:
            raise InvalidParameterError(f"unknown multipart part(s) {unknown}; send `{FILE_PART}` and `{REQUEST_PART}`")
        upload = form.get(FILE_PART)
        if not isinstance(upload, UploadFile):
            raise InvalidParameterError(f"the multipart part `{FILE_PART}` must be a file (the RNA-Seq profile)")
        data = await upload.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise InvalidParameterError(f"RNA profile larger than {MAX_BYTES // (1024 * 1024)} MiB")
        body = form.get(REQUEST_PART) or ""
        if not isinstance(body, str):
            raise InvalidParameterError(f"the multipart part `{REQUEST_PART}` must be JSON text, not a file")
    scope = dict(request.scope)
    scope["headers"] = [
        (k, v) for k, v in request.scope["headers"] if k.lower() not in (b"content-type", b"content-length")
    ]
    scope["headers"].append((b"content-type", b"application/json"))
    scope["state"] = {**request.scope.get("state", {}), "rna_file": data}
    payload = body.encode()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": payload, "more_body": False}

    return Request(scope, receive)
