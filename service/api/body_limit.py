"""Over-long request bodies get the documented error body, not Starlette's plain-text "Content Too Large".

FastAPI enforces `max_body_size` in a layer outside the app's exception handlers and user middleware, so the
413 it sends never reaches them. `GatewayApp` wraps its whole middleware stack in `JsonTooLarge`, which turns
that plain-text 413 into `{"error": {"code": "request_too_large", "message"}}` (JSON answers pass untouched)."""

from __future__ import annotations

import json

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CODE = "request_too_large"


def message(limit: int | None) -> str:
    within = f" of {limit} bytes" if limit else ""
    return (
        f"the request body is over the limit{within} for JSON requests; slides are uploaded to POST /slides as "
        "multipart/form-data (limit MSTAR_UPLOAD_MAX_BYTES)"
    )


class JsonTooLarge:
    def __init__(self, app: ASGIApp, limit: int | None) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the plain-text body that belonged to the replaced start
            if message["type"] == "http.response.start" and message["status"] == 413:
                ctype = Headers(raw=message.get("headers", [])).get("content-type", "")
                if ctype.startswith("text/plain"):
                    replaced = True
                    await self._send_json(send)
                    return
            await send(message)

        await self.app(scope, receive, send_json)

    async def _send_json(self, send: Send) -> None:
        body = json.dumps({"error": {"code": CODE, "message": message(self.limit)}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is not read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class GatewayApp(FastAPI):
    """FastAPI whose every answer, including the body-size refusal, is the documented JSON error body."""

    def build_middleware_stack(self) -> ASGIApp:
        return JsonTooLarge(super().build_middleware_stack(), self.max_body_size)
