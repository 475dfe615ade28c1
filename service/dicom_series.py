"""Moved to `service.ingest.series` (one ingest path for every source); kept so old imports work."""

from service.ingest.series import (  # noqa: F401
    FORMAT,
    MAX_FILES,
    Series,
    StagedSeries,
    collect,
    is_zip,
    series_digest,
    stage,
    unpack_zip,
    zip_series,
)
