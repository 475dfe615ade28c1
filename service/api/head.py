"""HEAD on every GET route (RFC 9110 §9.3.2): the GET's status and headers, no body.

FastAPI registers a route for the methods it names only, so `HEAD /jobs/{id}/features` (what `curl -I`, load
balancers and download managers send to learn a size or an ETag) answered 405. This middleware runs the GET and
drops its body; the route's checks (tenant, ids, state) are the GET's, so a HEAD never says more than a GET."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        sent_end = False

        async def headers_only(message: Message) -> None:
            nonlocal sent_end
            if message["type"] == "http.response.body":
                if sent_end:
                    return
                sent_end = not message.get("more_body", False)
                if not sent_end:
                    return  # the GET's body is dropped as it streams; one empty final message ends the response
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
