"""A slide that lives in a PACS, opened like a file: `DicomWebReader` is the DICOM reader over WADO-RS.

wsidicom reads the series' instance metadata, then fetches frames one by one as `read_region` needs them.
The pipeline asks for the tissue mask from a coarse level first and then reads only the patches under
tissue, so only those frames travel; the session counts every byte received. wsidicom sees only the VOLUME
instances: nothing of the label, overview or thumbnail instances is requested. Frames travel in the transfer
syntax they are stored in (`_volume_client`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import CorruptSlideError, MstarError, SlideError, SlideTooLargeError
from service.pacs.client import PacsSession, SlideSeries, find_slide_series, make_client, translate
from service.pacs.config import PacsServer, PacsSettings
from service.slides.readers.dicom_reader import DicomReader, _header_check, matrix_frames, no_spacing

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


def _joined_web_source(client: Any, study: str, series: str, syntaxes: list, name: str) -> Any:
    """wsidicom's DICOMweb source with each concatenation (a level stored as several instances sharing a
    ConcatenationUID, as converters split levels too large for one file) joined into one instance, as its file
    source does. Its web source takes each part for a whole level and numbers every part's frames from the
    level's first: tile (0, 0) came from the second part's first frame, and a later frame number was out of the
    part's range (HTTP 400)."""
    from pydicom.uid import UID
    from wsidicom.web.wsidicom_web_source import WsiDicomWebSource

    class JoinedWebSource(WsiDicomWebSource):
        def __init__(self) -> None:
            super().__init__(client, UID(study), [UID(series)], [UID(s) for s in syntaxes])
            self._joined = _join_concatenations(
                client, super().level_instances, self._decoded_frame_cache, self._encoded_frame_cache, name
            )

        @property
        def level_instances(self) -> list:
            return self._joined

    return JoinedWebSource()


def _join_concatenations(client: Any, instances: list, decoded: Any, encoded: Any, name: str) -> list:
    """`instances` with the parts of each concatenation made one instance whose frames are fetched from the
    part holding them; a concatenation whose parts do not hold its frames one after another from the first
    (a part missing from the PACS) is refused."""
    from wsidicom.instance import WsiInstance

    joined, parts_of = [], {}
    for inst in instances:
        uid = inst.dataset.uids.concatenation
        if uid is None:
            joined.append(inst)
        else:
            parts_of.setdefault(str(uid), []).append(inst)
    for uid, parts in parts_of.items():
        datasets = sorted((p.dataset for p in parts), key=lambda d: d.frame_offset)
        _check_parts(uid, datasets, name)
        data = _concatenated_image_data(client, datasets, parts[0].image_data.transfer_syntax, decoded, encoded)
        joined.append(WsiInstance(datasets, data))
    return joined


def _check_parts(uid: str, datasets: list, name: str) -> None:
    """Refuse a concatenation whose parts (by frame offset) do not hold its frames one after another from the
    first, or fewer parts or frames than it declares: a part missing from the PACS, or two overlapping."""
    first = datasets[0].as_dataset()

    def incomplete(what: str) -> CorruptSlideError:
        return CorruptSlideError(
            f"concatenation {uid} is incomplete: {what} (a part missing from the PACS?)", slide=name
        )

    offset = 0
    for d in datasets:
        if d.frame_offset != offset:
            raise incomplete(f"a part starts at frame {d.frame_offset + 1}, not {offset + 1}")
        offset += d.frame_count
    total = first.get("InConcatenationTotalNumber")
    if total is not None and len(datasets) != int(total):
        raise incomplete(f"{len(datasets)} of its {int(total)} parts are here")
    if datasets[0].states_tiled_full:
        expected = matrix_frames(first)
        if offset != expected:
            raise incomplete(f"its parts hold {offset} frames, its tiling {expected}")


def _concatenated_image_data(client: Any, datasets: list, syntax: Any, decoded: Any, encoded: Any) -> Any:
    """Image data over the parts of a concatenation (`datasets`, by frame offset): frame i of the level is
    frame i - offset + 1 of the part whose range holds it."""
    from wsidicom.codec import Codec
    from wsidicom.instance import WsiDicomImageData
    from wsidicom.web.wsidicom_web_image_data import WsiDicomWebImageData

    class ConcatenatedWebImageData(WsiDicomWebImageData):
        def __init__(self) -> None:
            first = datasets[0]
            self._client = client
            self._study_uid = first.uids.slide.study_instance
            self._series_uid = first.uids.slide.series_instance
            self._instance_uid = first.uids.instance
            self._transfer_syntax = syntax
            self._parts = [(d.frame_offset, d.frame_count, d.uids.instance) for d in datasets]
            codec = Codec.create(
                syntax, first.samples_per_pixel, first.bits, first.tile_size, first.photometric_interpretation
            )
            WsiDicomImageData.__init__(self, datasets, codec, decoded, encoded)

        def _locate(self, frame_index: int) -> tuple[Any, int]:
            for offset, count, uid in self._parts:
                if offset <= frame_index < offset + count:
                    return uid, frame_index - offset + 1
            raise ValueError(f"frame {frame_index + 1} is in no part of the concatenation")

        def _get_tile_frame(self, frame_index: int) -> bytes:
            return next(self._get_tile_frames([frame_index]))

        def _get_tile_frames(self, frame_indices):
            located = [self._locate(i) for i in frame_indices]
            for uid, run in itertools.groupby(located, key=lambda loc: loc[0]):
                numbers = [number for _, number in run]
                yield from self._client.get_frames(
                    self._study_uid, self._series_uid, uid, numbers, self._transfer_syntax
                )

    return ConcatenatedWebImageData()


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
                source = _joined_web_source(
                    _volume_client(client, session, volumes),
                    series.study_uid,
                    series.series_uid,
                    [*PREFERRED_WEB_TRANSFER_SYNTAXES, *_HTJ2K],
                    self.path.name,
                )
                self._wsi = WsiDicom(source, True)
        except Exception as exc:
            no_spacing(exc, self.path.name)
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
