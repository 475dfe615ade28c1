"""API-only refusals (auth, lookups, state conflicts) and the handlers that render every error the same way:
`{"error": {"code", "message"}}` with the error's HTTP status. Bad input never becomes a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import MstarError
from service.ingest.multipart import RequestError, UnsupportedMediaTypeError  # noqa: F401  (400, 415; moved)

log = logging.getLogger("mstar.api")


class UnauthorizedError(MstarError):
    code = "unauthorized"
    http_status = 401


class ForbiddenError(MstarError):
    code = "forbidden"
    http_status = 403


class NotFoundError(MstarError):
    code = "not_found"
    http_status = 404


class NotReadyError(MstarError):
    """The job has not (successfully) finished, so it has no result yet."""

    code = "not_ready"
    http_status = 409


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(MstarError)
    async def _mstar(_request: Request, err: MstarError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="mstar"'} if err.http_status == 401 else {}
        retry_after = getattr(err, "retry_after", None)  # 429 quota / 503 busy: when to try again
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after))
        return JSONResponse(error_body(err.code, str(err)), status_code=err.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ())) or "request"
        body = error_body("invalid_request", f"{loc}: {first.get('msg', 'invalid')}")
        body["error"]["details"] = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors[:20]
        ]
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            403: "forbidden",
            413: "request_too_large",
        }.get(err.status_code, f"http_{err.status_code}")
        headers = dict(getattr(err, "headers", None) or {})
        if err.status_code == 405:  # Starlette names one route's methods; list every route on this path
            methods = {
                m
                for r in request.app.router.routes
                if getattr(r, "path_regex", None) is not None and r.path_regex.match(request.url.path)
                for m in (getattr(r, "methods", None) or ())
            }
            headers["Allow"] = ", ".join(sorted(methods))
        detail = str(err.detail)
        if err.status_code == 413:  # the app's JSON body cap (FastAPI's max_body_size): say which limit
            from service.api.body_limit import message

            detail = message(getattr(request.app, "max_body_size", None))
        return JSONResponse(error_body(code, detail), status_code=err.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        from service.errors import is_disk_full
        from service.store.db import db_full

        if is_disk_full(err, also=db_full):  # e.g. a DELETE on a full disk: the store refused the write
            log.error(
                "no space left in the store on %s %s",
                request.method,
                request.scope.get("route") and request.scope["route"].path,
            )
            message = "the store has no space left, so the request was not carried out; retry when space is freed"
            return JSONResponse(error_body("storage_full", message), status_code=507)
        log.exception(
            "unhandled error on %s %s",
            request.method,
            request.scope.get("route") and request.scope["route"].path,
        )
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
