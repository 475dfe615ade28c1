"""Moved to `service.ingest.probe`; `python -m service.api.probe PATH` still runs the check."""

import sys

from service.ingest.probe import main, probe  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
