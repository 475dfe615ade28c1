"""Moved to `service.ingest` (`multipart` for the body, `probe` for the check); kept so old imports work."""

from service.ingest.multipart import (  # noqa: F401
    FILE_FIELD,
    MAX_FIELD_BYTES,
    MAX_PARTS,
    TEXT_FIELDS,
    ParsedUpload,
    parse_bool,
    parse_mpp,
    receive_upload,
)
from service.ingest.probe import check_slide, probe_slide  # noqa: F401
