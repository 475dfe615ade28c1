"""Signed job webhooks: an HMAC-SHA256 over `"{timestamp}.{body}"`, POSTed with retries and backoff.

Receivers verify with `verify(secret, timestamp, body, signature)` and should refuse timestamps older than a
few minutes (replay). The payload carries ids and states only, never file names or patient data.
Destinations are checked against loopback/private/link-local networks (SSRF) unless the deployment
allows them.

Exactly one sender per job: `claim` moves the job's `webhook_claimed_at` from NULL to now with a conditional
UPDATE on a terminal row, so whichever process wins it (the task that ran the job, a pool master that decided
a crash or a hard time limit, the gateway's sweep, the embedded runner for its jobs, API cancels and start-up
recovery) delivers, and every other caller gets None. A process that
dies between the claim and the POST loses that delivery; receivers can always poll `GET /jobs/{id}`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.errors import InvalidParameterError

log = logging.getLogger("mstar.webhooks")

SIGNATURE_HEADER = "X-Mstar-Signature"
TIMESTAMP_HEADER = "X-Mstar-Timestamp"


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
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
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


def claim(s: Any, job_id: str) -> tuple[str, dict] | None:
    """(url, payload) when this caller wins the job's terminal webhook; None when it has none, is not
    terminal yet, or another caller claimed it first. `s` is a SQLAlchemy session inside a transaction."""
    from sqlalchemy import update

    from service.store.models import TERMINAL_STATES, Job, utcnow

    won = s.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.in_(TERMINAL_STATES),
            Job.webhook_url.is_not(None),
            Job.webhook_claimed_at.is_(None),
        )
        .values(webhook_claimed_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if won != 1:
        return None
    job = s.get(Job, job_id, populate_existing=True)
    return job.webhook_url, job_payload(job)


def send_for_job(factory: Any, job_id: str, settings: Settings) -> bool | None:
    """Claim the job's terminal webhook and deliver it (with retries). None when not ours to send."""
    from service.store.db import transaction

    with transaction(factory) as s:
        got = claim(s, job_id)
    if got is None:
        return None
    url, payload = got
    ok = deliver(url, payload, settings)
    log.info("webhook for job %s (%s): %s", job_id, payload["state"], "delivered" if ok else "given up")
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
