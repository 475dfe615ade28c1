"""Signed job webhooks: an HMAC-SHA256 over `"{timestamp}.{body}"`, POSTed with retries and backoff.

Receivers verify with `verify(secret, timestamp, body, signature)` and should refuse timestamps older than a
few minutes (replay). The payload carries ids and states only, never file names or patient data.
Destinations are checked against loopback/private/link-local networks (SSRF) unless the deployment
allows them.

One sender at a time per job: `claim` moves the job's `webhook_claimed_at` from NULL to now with a conditional
UPDATE on a terminal row, so whichever process wins it (the task that ran the job, a pool master that decided
a crash or a hard time limit, the gateway's sweep, the embedded runner for its jobs, API cancels and start-up
recovery) delivers, and every other caller gets None. The winner records `webhook_sent_at` when it is done
(delivered, or given up after its retries). A claim still unfinished after `claim_lease_s` (longer than any
live sender's retries take) belongs to a sender that died, and the sweep may claim it again: delivery is at
least once, and in practice once. Every attempt carries the same `X-Mstar-Event-Id` (job id and state), so a
receiver can drop the rare repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.errors import InvalidParameterError

log = logging.getLogger("mstar.webhooks")

SIGNATURE_HEADER = "X-Mstar-Signature"
TIMESTAMP_HEADER = "X-Mstar-Timestamp"
EVENT_ID_HEADER = "X-Mstar-Event-Id"  # the same on every attempt and re-send of one job's terminal event
#: added to the slowest possible delivery before a silent claim is taken over
CLAIM_GRACE_S = 60.0


#: internal but not `is_private` in Python 3.11: carrier-grade NAT (RFC 6598), used for cluster and VPC networks
_SHARED_NETS = (ipaddress.ip_network("100.64.0.0/10"),)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse schemes other than http(s) and, unless allowed, hosts that resolve to internal addresses."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidParameterError("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameterError("webhook_url must be an absolute http(s) URL")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise InvalidParameterError("webhook_url host does not resolve") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        internal = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
        if internal or ip.is_unspecified or any(ip in net for net in _SHARED_NETS):
            raise InvalidParameterError("webhook_url points at an internal network address")


def job_payload(job) -> dict:
    return {
        "event": f"job.{job.state}",
        "job_id": job.id,
        "slide_id": job.slide_id,
        "state": job.state,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "result_url": f"/jobs/{job.id}/result" if job.state == "succeeded" else None,
    }


def deliver(url: str, payload: dict, settings: Settings, *, client: httpx.Client | None = None) -> bool:
    """POST with retries (exponential backoff) until a 2xx; False when every attempt failed."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    delay = settings.webhook_backoff_s
    own = client is None
    client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
    try:
        for attempt in range(1, settings.webhook_max_attempts + 1):
            try:
                check_url(url, allow_private=settings.webhook_allow_private)
                ts = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    TIMESTAMP_HEADER: ts,
                    EVENT_ID_HEADER: f"{payload.get('job_id')}.{payload.get('state')}",
                    "X-Mstar-Attempt": str(attempt),
                }
                if secret:
                    headers[SIGNATURE_HEADER] = sign(secret, ts, body)
                resp = client.post(url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    return True
                log.info(
                    "webhook for job %s: HTTP %s (attempt %d)",
                    payload.get("job_id"),
                    resp.status_code,
                    attempt,
                )
            except InvalidParameterError as err:
                log.warning("webhook for job %s refused: %s", payload.get("job_id"), err)
                return False
            except httpx.HTTPError as err:
                log.info("webhook for job %s: %s (attempt %d)", payload.get("job_id"), type(err).__name__, attempt)
            if attempt < settings.webhook_max_attempts:
                time.sleep(delay)
                delay *= 2
        return False
    finally:
        if own:
            client.close()


def claim_lease_s(settings: Settings) -> float:
    """How long a claimed delivery may stay unfinished before it is presumed dead: every attempt timing out,
    every backoff slept, plus a grace period."""
    n = settings.webhook_max_attempts
    sleeps = settings.webhook_backoff_s * (2 ** (n - 1) - 1)
    return n * settings.webhook_timeout_s + sleeps + CLAIM_GRACE_S


@dataclass(frozen=True)
class Claim:
    url: str
    payload: dict
    claimed_at: datetime


def claim(s: Any, job_id: str, *, lease_s: float | None = None) -> Claim | None:
    """The delivery when this caller wins the job's terminal webhook; None when it has none, is not terminal
    yet, or another sender holds it. With `lease_s`, a claim older than that whose sender never finished is
    taken over. `s` is a SQLAlchemy session inside a transaction."""
    from sqlalchemy import update

    from service.store.models import TERMINAL_STATES, Job, utcnow

    now = utcnow()
    free = Job.webhook_claimed_at.is_(None)
    if lease_s is not None:
        free = free | (Job.webhook_sent_at.is_(None) & (Job.webhook_claimed_at < now - timedelta(seconds=lease_s)))
    won = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(TERMINAL_STATES), Job.webhook_url.is_not(None), free)
        .values(webhook_claimed_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if won != 1:
        return None
    job = s.get(Job, job_id, populate_existing=True)
    return Claim(job.webhook_url, job_payload(job), now)


def record(s: Any, job_id: str, claimed_at: datetime, *, delivered: bool) -> bool:
    """Mark the claim finished; False when a takeover replaced it meanwhile (that sender records its own)."""
    from sqlalchemy import update

    from service.store.models import Job, utcnow

    return (
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.webhook_claimed_at == claimed_at)
            .values(webhook_sent_at=utcnow(), webhook_delivered=delivered)
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def send_for_job(factory: Any, job_id: str, settings: Settings) -> bool | None:
    """Claim the job's terminal webhook (or take over a dead sender's), deliver it with retries and record the
    outcome. None when not ours to send."""
    from service.store.db import transaction

    with transaction(factory) as s:
        got = claim(s, job_id, lease_s=claim_lease_s(settings))
    if got is None:
        return None
    ok = deliver(got.url, got.payload, settings)
    with transaction(factory) as s:
        record(s, job_id, got.claimed_at, delivered=ok)
    log.info("webhook for job %s (%s): %s", job_id, got.payload["state"], "delivered" if ok else "given up")
    return ok


def send_in_background(factory: Any, job_id: str, settings: Settings) -> threading.Thread:
    """`send_for_job` on a short-lived daemon thread: for callers that must not wait on HTTP retries (the
    Celery pool master's event loop)."""

    def run() -> None:
        try:
            send_for_job(factory, job_id, settings)
        except Exception:  # the verdict is recorded either way; the receiver can poll
            log.exception("webhook for job %s failed", job_id)

    thread = threading.Thread(target=run, name=f"mstar-webhook-{job_id[:8]}", daemon=True)
    thread.start()
    return thread


class Deliveries:
    """Terminal webhooks delivered off the job slots, fair between tenants.

    A receiver that hangs holds a delivery for up to `claim_lease_s` (every attempt timing out, every backoff
    slept: about 65 s by default). Delivered on the worker's job slot, that stalled every tenant's next job; in
    one shared two-thread pool, one tenant's hanging receivers delayed every other tenant's webhooks. Here each
    tenant has its own queue, at most `per_tenant` of a tenant's deliveries run at once, and `threads` senders
    take the tenants in turn, so a tenant's slow receivers only wait on each other. Daemon threads: a process
    that exits mid-delivery leaves the claim unfinished, and the gateway's sweep sends it again after the claim
    lease (at least once, as before)."""

    def __init__(self, factory: Any, settings: Settings, *, threads: int = 4, per_tenant: int = 2) -> None:
        self.factory, self.settings = factory, settings
        self.per_tenant = max(1, min(per_tenant, threads))
        # a queue per tenant with deliveries waiting, the tenants in the order they are served (served: to the end)
        self._pending: OrderedDict[str, deque[str]] = OrderedDict()
        self._running: Counter[str] = Counter()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"mstar-webhook-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job_id: str, tenant_id: str | None = None) -> None:
        """Queue the job's webhook (a no-op at delivery when the job has none or another sender has it)."""
        tenant = tenant_id if tenant_id is not None else self._tenant(job_id)
        with self._cv:
            if self._closed:
                return
            queue = self._pending.setdefault(tenant, deque())
            if job_id in queue:  # the sweep found it again before it was sent
                return
            queue.append(job_id)
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._pending.values()) + sum(self._running.values())

    def close(self) -> None:
        """Stop taking deliveries; the ones queued and not started are left to the sweep (still unclaimed)."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()

    def _tenant(self, job_id: str) -> str:
        from sqlalchemy import select

        from service.store.db import transaction
        from service.store.models import Job

        try:
            with transaction(self.factory) as s:
                return s.scalar(select(Job.tenant_id).where(Job.id == job_id)) or ""
        except Exception as err:  # the store briefly unreachable: the delivery itself will say so
            log.warning("webhook for job %s: tenant lookup failed (%s)", job_id, type(err).__name__)
            return ""

    def _next(self) -> tuple[str, str] | None:
        """The next (tenant, job) whose tenant is under its cap, rotating through the tenants; None when closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                tenant = next((t for t in self._pending if self._running[t] < self.per_tenant), None)
                if tenant is None:
                    self._cv.wait()
                    continue
                queue = self._pending[tenant]
                job_id = queue.popleft()
                if queue:
                    self._pending.move_to_end(tenant)
                else:
                    del self._pending[tenant]
                self._running[tenant] += 1
                return tenant, job_id

    def _loop(self) -> None:
        while (got := self._next()) is not None:
            tenant, job_id = got
            try:
                send_for_job(self.factory, job_id, self.settings)
            except Exception:  # the verdict is recorded either way; the receiver can poll GET /jobs/{id}
                log.exception("webhook for job %s failed", job_id)
            finally:
                with self._cv:
                    self._running[tenant] -= 1
                    if not self._running[tenant]:
                        del self._running[tenant]
                    self._cv.notify_all()


_PROCESS_DELIVERIES: dict[tuple[int, int], Deliveries] = {}
_PROCESS_LOCK = threading.Lock()


def process_deliveries(factory: Any, settings: Settings) -> Deliveries:
    """This process's `Deliveries` over `factory` (a Celery worker child's: its job slot never waits on a
    receiver), started on first use, after any fork."""
    with _PROCESS_LOCK:
        key = (os.getpid(), id(factory))  # a forked child never uses its parent's (dead) sender threads
        got = _PROCESS_DELIVERIES.get(key)
        if got is None:
            got = _PROCESS_DELIVERIES[key] = Deliveries(factory, settings)
        return got
