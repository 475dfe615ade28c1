"""Build-time guard for the images: fail the build when a forbidden distribution slipped in (torch in a service
image, both onnxruntime builds in one image) or a required one is missing.

    python assert_dists.py --absent torch onnxruntime-gpu --present onnxruntime
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import distributions


def _installed() -> set[str]:
    return {(d.metadata["Name"] or "").lower().replace("_", "-") for d in distributions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--absent", nargs="*", default=[], help="distributions that must not be installed")
    ap.add_argument("--present", nargs="*", default=[], help="distributions that must be installed")
    args = ap.parse_args(argv)
    have = _installed()
    bad = sorted(n for n in args.absent if n.lower() in have)
    missing = sorted(n for n in args.present if n.lower() not in have)
    if bad:
        print(f"error: forbidden distribution(s) installed: {', '.join(bad)}", file=sys.stderr)
    if missing:
        print(f"error: required distribution(s) missing: {', '.join(missing)}", file=sys.stderr)
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
