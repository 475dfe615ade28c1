"""`RequestContextMiddleware`: every request gets a request id (the client's `X-Request-Id` when it is a plain
token, else a new one), echoed in the response and bound to the log context; after the response, requests to
tenant data are written to the audit log.

The audit decision is made in this one place from the matched route *template* and its path parameters, plus the
`Location` header of a create, so routes need no audit code (and new routes are covered by the same rules):

* DELETE -> delete; POST .../cancel -> cancel; POST .../reload -> reload; other POSTs -> create (of what
  `Location` names when it is set, e.g. the job an upload queued);
* GET of a result file (`result`, `features`, `heatmap.png`, thumbnails) -> download; other GETs -> read
  (lists included, with no resource id).

Who: the tenant and key prefix the auth dependency identified (`request.state.principal`); for a refused key,
the prefix of what was presented. From where: the peer address. Ids only: no file names, no query strings, no
bodies. A failed audit write is logged and never fails the request.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.obs import context

if TYPE_CHECKING:
    from service.api.context import ServiceContext

log = logging.getLogger("mstar.audit")

#: first path segment -> audited resource kind
RESOURCES = {"slides": "slide", "jobs": "job", "batches": "batch", "audit": "audit", "models": "model", "pacs": "pacs"}
# every route that hands out a result's content (the FHIR report, the DICOM objects, the outlines and heatmaps were
# logged as plain reads)
DOWNLOADS = {
    "result",
    "features",
    "heatmap.png",
    "heatmap",
    "annotations.geojson",
    "fhir",
    "dicom",
    "thumbnail",
    "thumbnail.png",
    "preview",
    "download",
}
VERBS = {"cancel", "reload"}
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")  # a path parameter is stored as plain ASCII (NUL breaks PostgreSQL)


def audit_action(method: str, template: str, path_params: dict[str, Any], location: str | None):
    """(action, resource, resource_id) for a request to `template`, or None when it is not audited."""
    parts = [p for p in template.strip("/").split("/") if p]
    if not parts or parts[0] not in RESOURCES:
        return None
    resource = RESOURCES[parts[0]]
    resource_id = next(iter(path_params.values()), None) if path_params else None
    last = parts[-1]
    if resource == "model" and method == "GET":  # the served bundle is no tenant's data
        return None
    if method == "DELETE":
        return "delete", resource, resource_id
    if method == "POST":
        if last in VERBS:
            return last, resource, resource_id
        if location:
            loc = [p for p in location.split("?")[0].strip("/").split("/") if p]
            if len(loc) >= 2 and loc[0] in RESOURCES:
                return "create", RESOURCES[loc[0]], loc[1]
        return "create", resource, resource_id
    if method == "GET":
        return ("download" if len(parts) > 1 and last in DOWNLOADS else "read"), resource, resource_id
    if method == "HEAD":  # the GET's headers (size, checksum), never its content
        return "read", resource, resource_id
    return None


def _presented_prefix(headers: Headers) -> str | None:
    from service.store.repo import key_prefix

    auth = headers.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "").strip()
    return key_prefix(token) if token else None


class AuditWriter:
    """Audit events written in batches by one background thread (one transaction per batch, at most every
    `FLUSH_S`), so a busy poller costs the database one insert per batch instead of one write transaction per
    request, and no request waits for the audit write. Each event keeps the time it happened; `close()` writes what
    is pending (gateway shutdown). A hard kill can lose at most the last `FLUSH_S` of events.

    Events the database refuses (its disk full, a failover) are kept, up to `MAX_HELD`, and written when it takes
    writes again, retried with a growing pause: they were dropped after one try."""

    FLUSH_S = 0.5
    MAX_BATCH = 500
    MAX_HELD = 100_000
    MAX_PAUSE_S = 30.0

    def __init__(self, sessions) -> None:
        import queue
        import threading

        self.sessions = sessions
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mstar-audit", daemon=True)
        self._thread.start()

    def put(self, event: dict) -> None:
        from service.store.models import utcnow

        self._queue.put({**event, "at": utcnow()})

    def _drain(self, wait: float | None) -> list[dict]:
        import queue

        batch: list[dict] = []
        try:
            batch.append(self._queue.get(timeout=wait) if wait else self._queue.get_nowait())
            while len(batch) < self.MAX_BATCH:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _run(self) -> None:
        import time

        held: list[dict] = []
        pause, next_try = 0.0, 0.0
        while not self._stop.is_set():
            held += self._drain(self.FLUSH_S)
            if held and time.monotonic() >= next_try:
                held = self._write(held)
                if held:
                    pause = min(self.MAX_PAUSE_S, max(1.0, 2 * pause))
                    next_try = time.monotonic() + pause
                    held = self._bounded(held)
                else:
                    pause = 0.0
        while batch := self._drain(None):
            held += batch
        if held and (left := self._write(held)):
            log.error(
                "could not write %d audit event(s) before shutting down, e.g. request %s",
                len(left),
                left[0]["request_id"],
            )

    def _bounded(self, held: list[dict]) -> list[dict]:
        if len(held) <= self.MAX_HELD:
            return held
        log.error("dropping %d audit event(s): the database has refused writes for too long", len(held) - self.MAX_HELD)
        return held[-self.MAX_HELD :]

    def _write(self, events: list[dict]) -> list[dict]:
        """Write `events` in batches, one transaction each; returns those not written (from the first refusal on)."""
        from service.store import audit
        from service.store.db import transaction

        for i in range(0, len(events), self.MAX_BATCH):
            batch = events[i : i + self.MAX_BATCH]
            try:
                with transaction(self.sessions) as s:
                    for event in batch:
                        audit.append(s, **event)
            except Exception as err:  # kept and retried; the requests were answered
                log.warning(
                    "could not write %d audit event(s) yet (%s); kept, retrying", len(events) - i, type(err).__name__
                )
                return events[i:]
        return []

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


class RequestContextMiddleware:
    """Pure ASGI (no body buffering). Outermost of the service's middlewares, so every response carries the id."""

    def __init__(self, app: ASGIApp, ctx: ServiceContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = context.safe_request_id(headers.get("x-request-id")) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        seen: dict[str, Any] = {"status": 500, "location": None}

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                out = MutableHeaders(scope=message)
                out["X-Request-Id"] = rid
                seen["location"] = out.get("location")
            await send(message)

        with context.log_context(request_id=rid, tenant=None, job_id=None):
            try:
                await self.app(scope, receive, _send)
            finally:
                if self.ctx.settings.audit_enabled:
                    event = self._event(scope, headers, state, seen, rid)
                    if event is not None:  # a client gone mid-response is still audited
                        self.ctx.audit_writer.put(event)

    @staticmethod
    def _event(scope: Scope, headers: Headers, state: dict, seen: dict, rid: str) -> dict | None:
        route = scope.get("route")
        template = getattr(route, "path", None)
        if template is None:  # unmatched paths touch nothing
            return None
        what = audit_action(scope.get("method", ""), template, scope.get("path_params") or {}, seen["location"])
        if what is None:
            return None
        action, resource, resource_id = what
        principal = state.get("principal")
        client = scope.get("client")
        return {
            "tenant_id": getattr(principal, "tenant_id", None),
            "key_prefix": getattr(principal, "key_prefix", None) or _presented_prefix(headers),
            "action": action,
            "resource": resource,
            "resource_id": (_UNPRINTABLE.sub("?", str(resource_id))[:64] if resource_id is not None else None),
            "method": scope.get("method", "")[:8],
            "route": template[:128],
            "status": int(seen["status"]),
            "client": (client[0][:64] if client else None),
            "request_id": rid,
        }
