"""The DICOMweb client side: one `requests` session per server (auth, TLS, timeouts, a byte counter), PACS
faults turned into typed job failures, and QIDO-RS discovery of the slide series to analyse.

Errors name the server, the HTTP status and the (opaque) UIDs only: never a patient attribute, never a URL
with credentials.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import requests

from service.errors import MstarError
from service.pacs.config import PacsServer

SM_MODALITY = "SM"
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
# QIDO attributes a discovery needs: ImageType, frames, tile and matrix size, optical paths and focal planes
# (the frames a matrix holds; all pixel geometry, no PHI)
_INSTANCE_FIELDS = [
    "00080008",
    "00080016",
    "00280008",
    "00280010",
    "00280011",
    "00480006",
    "00480007",
    "00480302",
    "00480303",
]


class PacsError(MstarError):
    """The PACS refused or failed a request; the job fails with this reason."""

    code = "pacs_error"
    http_status = 502


class PacsUnauthorizedError(PacsError):
    code = "pacs_unauthorized"


class PacsForbiddenError(PacsError):
    code = "pacs_forbidden"


class PacsNotFoundError(PacsError):
    code = "pacs_not_found"


class PacsUnavailableError(PacsError):
    code = "pacs_unavailable"


class PacsTimeoutError(PacsError):
    code = "pacs_timeout"


class PacsBadResponseError(PacsError):
    code = "pacs_bad_response"


class PacsStoreIncompleteError(PacsError):
    """STOW-RS answered, but the PACS did not keep every object (a FailedSOPSequence, or an instance that
    QIDO-RS cannot find afterwards: some PACS drop a SOP class they do not support without saying so)."""

    code = "pacs_store_incomplete"


class NoSlideSeriesError(MstarError):
    code = "no_slide_series"
    http_status = 422


class NoVolumeImageError(MstarError):
    code = "no_volume_image"
    http_status = 422


class PacsSession(requests.Session):
    """A session that applies the server's timeouts to every request and counts the body bytes received
    (reading a body once here is free: `requests` replays `.content` to streaming readers)."""

    def __init__(self, server: PacsServer) -> None:
        super().__init__()
        self.timeout = (server.connect_timeout_s, server.read_timeout_s)
        self.verify = str(server.ca_bundle) if server.ca_bundle else server.verify_tls
        if server.auth == "basic":
            self.auth = (server.username or "", server.password.get_secret_value() if server.password else "")
        elif server.auth == "bearer" and server.token is not None:
            self.headers["Authorization"] = f"Bearer {server.token.get_secret_value()}"
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.requests_made = 0
        self.frames_fetched = 0

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:  # dicomweb-client passes timeout=None explicitly
            kwargs["timeout"] = self.timeout
        resp = super().request(method, url, *args, **kwargs)
        n = len(resp.content)
        path = str(url).split("?")[0]
        frames = len(path.split("/frames/", 1)[1].split(",")) if "/frames/" in path else 0
        with self._lock:
            self.bytes_received += n
            self.requests_made += 1
            self.frames_fetched += frames
        return resp


def make_client(server: PacsServer) -> tuple[Any, PacsSession]:
    """A `dicomweb_client.DICOMwebClient` for `server` and its counting session."""
    from dicomweb_client import DICOMwebClient

    session = PacsSession(server)
    client = DICOMwebClient(
        server.url,
        qido_url_prefix=server.qido_prefix,
        wado_url_prefix=server.wado_prefix,
        stow_url_prefix=server.stow_prefix,
        session=session,
        timeout=session.timeout,
    )
    # Our own policy governs retries (STOW: `writeback.store_with_retry`); the client's built-in one would
    # retry 503s five times with long waits before a job could fail.
    client.set_http_retry_params(retry=False)
    return client, session


def translate(err: BaseException, server: str, what: str) -> MstarError:
    """A `PacsError` subclass for a requests/dicomweb-client failure during `what`."""
    if isinstance(err, MstarError):
        return err
    where = f"PACS {server!r} {what}"
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        cls = {401: PacsUnauthorizedError, 403: PacsForbiddenError, 404: PacsNotFoundError}.get(status)
        if cls is None:
            cls = PacsUnavailableError if status >= 500 else PacsError
        reason = {401: "rejected the credentials", 403: "denied access", 404: "does not have it"}.get(status, "failed")
        return cls(f"{where}: HTTP {status} ({reason})")
    if isinstance(err, requests.Timeout) or "timed out" in str(err).lower():
        return PacsTimeoutError(f"{where}: no answer within the configured timeout")
    if isinstance(err, requests.ConnectionError):
        return PacsUnavailableError(f"{where}: cannot connect")
    if isinstance(err, ValueError | KeyError | TypeError | IndexError):  # JSON / multipart that does not parse
        return PacsBadResponseError(f"{where}: the answer is not valid DICOMweb ({type(err).__name__})")
    return PacsError(f"{where}: {type(err).__name__}")


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


@dataclass(frozen=True)
class SlideSeries:
    """The slide series chosen for analysis: its VOLUME instances' QIDO metadata and frame count."""

    study_uid: str
    series_uid: str
    volume_instances: list[dict]
    frames_total: int


def _search(call, server: str, what: str) -> list[dict]:
    try:
        found = call()
    except Exception as err:
        raise translate(err, server, what) from err
    if not isinstance(found, list) or not all(isinstance(x, dict) for x in found):
        raise PacsBadResponseError(f"PACS {server!r} {what}: the answer is not a DICOM JSON list")
    return found


def find_slide_series(client: Any, server: str, study_uid: str, series_uid: str | None = None) -> SlideSeries:
    """QIDO-RS: the study's slide microscopy series (Modality SM) and its VOLUME instances. Label, overview
    and thumbnail instances are left out; without `series_uid` the study must hold exactly one SM series."""
    filters: dict[str, Any] = {"Modality": SM_MODALITY}
    if series_uid:
        filters["SeriesInstanceUID"] = series_uid
    series = _search(
        lambda: client.search_for_series(study_uid, search_filters=filters),
        server,
        f"series search in study {study_uid}",
    )
    uids = sorted({str(_value(s, "0020000E")) for s in series if _value(s, "0020000E")})
    if series_uid and series_uid not in uids:
        raise NoSlideSeriesError(f"study {study_uid} has no slide microscopy (SM) series {series_uid}")
    if not uids:
        raise NoSlideSeriesError(f"study {study_uid} has no slide microscopy (SM) series")
    if not series_uid and len(uids) > 1:
        raise NoSlideSeriesError(f"study {study_uid} has {len(uids)} slide series; name one with series_uid")
    chosen = series_uid or uids[0]
    instances = _search(
        lambda: client.search_for_instances(study_uid, chosen, fields=_INSTANCE_FIELDS),
        server,
        f"instance search in series {chosen}",
    )
    volumes = [
        i
        for i in instances
        if str(_value(i, "00080016")) == WSI_SOP_CLASS
        and len(_values(i, "00080008")) > 2
        and str(_values(i, "00080008")[2]).upper() == "VOLUME"
    ]
    if not volumes:
        raise NoVolumeImageError(f"series {chosen} has no whole-slide VOLUME image (only label/overview or none)")
    frames = sum(int(_value(i, "00280008") or 1) for i in volumes)
    return SlideSeries(study_uid, chosen, volumes, frames)
