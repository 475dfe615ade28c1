"""Ingest: one path from any source (multipart upload, ZIP of a DICOM series, file, DICOM series folder,
http(s), s3) through dedup -> check (the out-of-process probe) -> record -> publish. See `ingestor.py`.

Modules: `ingestor` (the path), `multipart` (the upload body), `sources` (file, http(s), s3), `series` (DICOM
series folders and ZIPs), `probe` (the check process), `slots` (concurrent upload bounds), `disk` (full disk).
"""

from service.ingest.ingestor import Ingested, Ingestor, SlideConflictError, check_same_mpp, find_job_by_key

__all__ = ["Ingested", "Ingestor", "SlideConflictError", "check_same_mpp", "find_job_by_key"]
