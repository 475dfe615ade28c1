"""A slide that lives in a PACS, opened like a file: `DicomWebReader` is the DICOM reader over WADO-RS.

wsidicom reads the series' instance metadata, then fetches frames one by one as `read_region` needs them.
The pipeline asks for the tissue mask from a coarse level first and then reads only the patches under
tissue, so only those frames travel; the session counts every byte received. wsidicom sees only the VOLUME
instances: nothing of the label, overview or thumbnail instances is requested. Frames travel in the transfer
syntax they are stored in (`_volume_client`).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import MstarError, SlideError, SlideTooLargeError
from service.pacs.client import PacsSession, SlideSeries, find_slide_series, make_client, translate
from service.pacs.config import PacsServer, PacsSettings
from service.slides.readers.dicom_reader import DicomReader, _header_check

#: the syntaxes wsidicom may ask for: its defaults, plus HTJ2K, which archives increasingly keep and it decodes
_HTJ2K = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
_ANY_SYNTAX = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_SYNTAX_PARAM = re.compile(r"transfer-syntax\s*=\s*\"?([0-9][0-9.]*)")


def _volume_client(client: Any, session: PacsSession | None, volumes: set[str] | None) -> Any:
    """A `WsiDicomWebClient` that shows wsidicom only the series' VOLUME instances and asks for their frames in
    the syntax they are stored in.

    - Only volumes: wsidicom otherwise opens every instance of the series and fetches frame 1 of each, the
      label's too (patient data) and the overview's; the reader never uses them. (`volumes` None: a server
      whose search gave no instance UIDs; then every instance, as before.)
    - The stored syntax: wsidicom asks for frame 1 in its preferred syntaxes in turn, JPEG baseline first. A
      PACS storing JPEG 2000 then has to transcode. Orthanc without its GDCM plugin answers 500 and the series
      cannot be opened; a server that can transcode re-compresses lossless frames into lossy JPEG, so the
      pixels change. Here frame 1 is asked for once in whatever syntax it is stored in (`transfer-syntax=*`,
      PS3.18), and that syntax goes to wsidicom as the instance's available one, in place of its own probe
      (one request either way). Where the server names none, wsidicom probes as before.
    - Uncompressed frames come as `bytes` (see `get_frames`)."""
    from pydicom.uid import UID
    from wsidicom import WsiDicomWebClient

    class VolumeClient(WsiDicomWebClient):
        def get_wsi_instances(self, study_uid, series_uids):
            for series_uid, instance_uid, available in super().get_wsi_instances(study_uid, series_uids):
                if volumes is not None and str(instance_uid) not in volumes:
                    continue
                if available is None and session is not None:
                    stored = _stored_syntax(client, session, study_uid, series_uid, instance_uid)
                    available = None if stored is None else {UID(stored)}
                yield series_uid, instance_uid, available

        def get_frames(self, *args, **kwargs):
            # dicomweb-client hands uncompressed frames over as bytearrays, which wsidicom's raw decoder turns
            # into a list (pydicom takes a bytearray PixelData for a multi-value): bytes, as from files
            for frame in super().get_frames(*args, **kwargs):
                yield bytes(frame) if isinstance(frame, bytearray) else frame

    return VolumeClient(client)


def _stored_syntax(client: Any, session: PacsSession, study: str, series: str, instance: str) -> str | None:
    """The transfer syntax frame 1 of `instance` is stored in, from the server's answer to `transfer-syntax=*`
    (the response's or its first part's Content-Type); None where it names none or refuses."""
    import requests

    base = f"{client.base_url}/{client.wado_url_prefix}" if client.wado_url_prefix else str(client.base_url)
    url = f"{base}/studies/{study}/series/{series}/instances/{instance}/frames/1"
    try:
        resp = session.get(url, headers={"Accept": _ANY_SYNTAX})
    except requests.RequestException:
        return None  # wsidicom's own probe then meets the same fault and names it
    if resp.status_code != 200:
        return None
    found = _SYNTAX_PARAM.search(resp.headers.get("Content-Type", ""))
    if found is None:  # the part headers, before the first frame's bytes
        found = _SYNTAX_PARAM.search(resp.content[:4096].decode("latin-1"))
    return found.group(1) if found else None


class DicomWebReader(DicomReader):
    """`DicomReader` whose instances come from a DICOMweb server instead of files."""

    def __init__(
        self,
        client: Any,
        server: str,
        series: SlideSeries,
        *,
        max_side: int = 200_000,
        session: PacsSession | None = None,
    ) -> None:
        from pydicom import Dataset
        from wsidicom import WsiDicom
        from wsidicom.web.wsidicom_web_source import PREFERRED_WEB_TRANSFER_SYNTAXES

        self.path = Path(f"dicomweb-{series.series_uid}")  # error messages name the opaque series UID
        self.server = server
        self.series = series
        uids = []
        for inst in series.volume_instances:  # the bomb guard, from QIDO attributes before any frame
            ds = Dataset.from_json(inst)
            _header_check(ds, Path(str(ds.get("SOPInstanceUID", "instance"))), max_side, self.path.name)
            uids.append(str(ds.get("SOPInstanceUID") or ""))
        volumes = set(uids) if all(uids) else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._wsi = WsiDicom.open_web(
                    _volume_client(client, session, volumes),
                    series.study_uid,
                    series.series_uid,
                    requested_transfer_syntax=[*PREFERRED_WEB_TRANSFER_SYNTAXES, *_HTJ2K],
                )
        except Exception as exc:
            err = translate(exc, server, f"series {series.series_uid}")
            if type(err).__name__ == "PacsError" and not isinstance(exc, OSError):
                raise SlideError(
                    f"the series is not a readable whole-slide image (wsidicom said: {exc})", slide=self.path.name
                ) from exc
            raise err from exc
        try:
            self._setup(max_side)
        except SlideError:
            self._wsi.close()
            raise
        except Exception as exc:
            self._wsi.close()
            raise translate(exc, server, f"series {series.series_uid}") from exc
        self.format = "dicomweb"

    def _decode_tile(self, level: int, tx: int, ty: int):
        try:
            return super()._decode_tile(level, tx, ty)
        except SlideError as err:
            cause = err.__cause__
            if cause is not None and not isinstance(cause, MstarError) and _is_http(cause):
                raise translate(cause, self.server, f"frame ({tx}, {ty}) of level {level}") from cause
            raise


def _is_http(err: BaseException) -> bool:
    import requests

    return isinstance(err, requests.RequestException)


@dataclass
class PacsSlideSource:
    """What the pipeline gets instead of a path for a PACS slide: it opens the reader and names the slide."""

    server: PacsServer
    study_uid: str
    series_uid: str | None = None
    max_side: int = 200_000
    session: PacsSession | None = None
    series: SlideSeries | None = None

    @contextmanager
    def open_reader(self, mpp_override: float | None = None):
        from service.slides.mpp import override_mpp

        client, self.session = make_client(self.server)
        self.series = find_slide_series(client, self.server.name, self.study_uid, self.series_uid)
        self.series_uid = self.series.series_uid
        limit = PacsSettings().max_frames
        if self.series.frames_total > limit:
            raise SlideTooLargeError(
                f"the series declares {self.series.frames_total} frames, over the limit of {limit}",
                slide=self.series_uid,
            )
        reader = DicomWebReader(client, self.server.name, self.series, max_side=self.max_side, session=self.session)
        if mpp_override is not None:
            reader.mpp = override_mpp(mpp_override)
        try:
            yield reader
        finally:
            reader.close()

    def fingerprint(self) -> str:
        """Names the slide by its UIDs (opaque), the way a file is named by its content hash."""
        key = f"dicomweb:{self.study_uid}:{self.series_uid or ''}"
        return hashlib.sha256(key.encode()).hexdigest()

    def transfer(self) -> dict:
        """Bytes and requests this source cost so far, and frames available in the series."""
        s = self.session
        return {
            "kind": "dicomweb",
            "pacs": self.server.name,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "bytes_fetched": s.bytes_received if s else 0,
            "requests": s.requests_made if s else 0,
            "frames_fetched": s.frames_fetched if s else 0,
            "frames_in_series": self.series.frames_total if self.series else None,
        }
