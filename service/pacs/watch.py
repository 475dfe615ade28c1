"""`mstar pacs watch`: poll a PACS over QIDO-RS for slide series (Modality SM) not analysed yet and submit
each to the gateway (`POST /pacs/analyses`) once.

Works with any DICOMweb server (no push, no plugin). State is a small SQLite file: a series is recorded only
after the gateway accepted it, so a crash between the two re-submits it at the next poll, and the gateway's
idempotency key (server, study, series, options) turns that into the same job. A restart reads the file and
submits nothing it already did.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

from service.pacs.client import _search, _value, make_client
from service.pacs.config import PacsServer

log = logging.getLogger("mstar.pacs.watch")
PAGE = 500

Submit = Callable[[str, str], str]  # (study_uid, series_uid) -> job id


class WatchState:
    """Which series of which PACS were submitted, durably (SQLite, one commit per series)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS submitted (pacs TEXT NOT NULL, series_uid TEXT NOT NULL, "
                "study_uid TEXT NOT NULL, job_id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (pacs, series_uid))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def seen(self, pacs: str) -> set[str]:
        with closing(self._connect()) as db:
            return {r[0] for r in db.execute("SELECT series_uid FROM submitted WHERE pacs = ?", (pacs,))}

    def record(self, pacs: str, study_uid: str, series_uid: str, job_id: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO submitted VALUES (?, ?, ?, ?, ?)",
                (pacs, series_uid, study_uid, job_id, time.time()),
            )


def slide_series(server: PacsServer, *, study_date_from: str | None = None) -> Iterator[tuple[str, str]]:
    """(study_uid, series_uid) of every SM series on the server, page by page."""
    client, _ = make_client(server)
    filters: dict = {"Modality": "SM"}
    if study_date_from:
        filters["StudyDate"] = f"{study_date_from}-"
    offset = 0
    while True:
        page = _search(
            lambda o=offset: client.search_for_series(
                search_filters=filters, fields=["0020000D"], limit=PAGE, offset=o
            ),
            server.name,
            "series search",
        )
        for item in page:
            study, series = _value(item, "0020000D"), _value(item, "0020000E")
            if study and series:
                yield str(study), str(series)
        if len(page) < PAGE:
            return
        offset += len(page)


def poll_once(
    server: PacsServer,
    state: WatchState,
    submit: Submit,
    *,
    study_date_from: str | None = None,
    refused: list | None = None,
) -> list:
    """Submit every SM series not recorded yet; returns [(study, series, job_id)] submitted now. A series the
    gateway refuses is logged, added to `refused` as (study, series, reason) when given, and left unrecorded
    (tried again next poll) without holding up the series after it: one malformed series in the PACS must not
    stop every later slide from being analysed."""
    done = state.seen(server.name)
    submitted = []
    for study, series in slide_series(server, study_date_from=study_date_from):
        if series in done:
            continue
        try:
            job_id = submit(study, series)
        except Exception as err:
            log.warning("series %s not submitted (%s); trying again next poll", series, err)
            if refused is not None:
                refused.append((study, series, str(err)))
            continue
        state.record(server.name, study, series, job_id)
        done.add(series)
        submitted.append((study, series, job_id))
        log.info("series %s submitted as job %s", series, job_id)
    return submitted


def gateway_submitter(gateway: str, api_key: str, pacs: str, *, timeout_s: float = 30.0) -> Submit:
    """`submit` that POSTs to the gateway's `/pacs/analyses` (the job's own idempotency key makes a repeat
    return the first job)."""
    import httpx

    def submit(study: str, series: str) -> str:
        r = httpx.post(
            gateway.rstrip("/") + "/pacs/analyses",
            json={"pacs": pacs, "study_uid": study, "series_uid": series},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )
        if r.status_code != 202:
            raise RuntimeError(f"the gateway refused series {series}: HTTP {r.status_code} {r.text[:300]}")
        return str(r.json()["id"])

    return submit
