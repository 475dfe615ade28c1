"""A slide that lives in a PACS, opened like a file: `DicomWebReader` is the DICOM reader over WADO-RS.

wsidicom reads the series' instance metadata, then fetches frames one by one as `read_region` needs them.
The pipeline asks for the tissue mask from a coarse level first and then reads only the patches under
tissue, so only those frames travel; the session counts every byte received. Label and overview pixels are
never requested.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import MstarError, SlideError, SlideTooLargeError
from service.pacs.client import PacsSession, SlideSeries, find_slide_series, make_client, translate
from service.pacs.config import PacsServer, PacsSettings
from service.slides.readers.dicom_reader import DicomReader, _header_check


class DicomWebReader(DicomReader):
    """`DicomReader` whose instances come from a DICOMweb server instead of files."""

    def __init__(self, client: Any, server: str, series: SlideSeries, *, max_side: int = 200_000) -> None:
        from pydicom import Dataset
        from wsidicom import WsiDicom, WsiDicomWebClient

        self.path = Path(f"dicomweb-{series.series_uid}")  # error messages name the opaque series UID
        self.server = server
        self.series = series
        for inst in series.volume_instances:  # the bomb guard, from QIDO attributes before any frame
            ds = Dataset.from_json(inst)
            _header_check(ds, Path(str(ds.get("SOPInstanceUID", "instance"))), max_side, self.path.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._wsi = WsiDicom.open_web(WsiDicomWebClient(client), series.study_uid, series.series_uid)
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
        reader = DicomWebReader(client, self.server.name, self.series, max_side=self.max_side)
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
