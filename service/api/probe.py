"""Upload check, run as a separate process: `python -m service.api.probe PATH [--mpp X]`.

The gateway never parses or decodes slide bytes itself (OpenSlide/libtiff/openjpeg have had memory-safety
bugs, and a hostile file must not take down the API). This process sniffs the container, opens the slide,
checks its µm/px and decodes a thumbnail, then prints one JSON line: `{"format", "info"}` or
`{"error": {"code", "message"}}`. A crash or timeout is reported by the parent as a corrupt slide.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def probe(path: str, mpp_override: float | None) -> dict:
    from service.slides.open import open_slide_checked

    with open_slide_checked(path, mpp_override=mpp_override) as reader:
        reader.thumbnail(256)  # decode the coarsest level: catches damaged pixel data, not just headers
        return {"format": getattr(reader, "format", None), "info": reader.describe()}


def main(argv: list[str] | None = None) -> int:
    from service.errors import MstarError

    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--max-memory-mb", type=int, default=0)
    args = ap.parse_args(argv)
    # Limits first, before any decoder is loaded: no core dumps of patient data, and an address-space cap
    # that turns a decompression bomb into a MemoryError here instead of an OOM kill elsewhere.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.max_memory_mb:
        cap = args.max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        out = probe(args.path, args.mpp)
    except MstarError as err:
        # The staging file name is ours (random), but say nothing about paths to the client anyway.
        msg = str(err).replace(args.path, "upload").replace(args.path.rsplit("/", 1)[-1], "upload")
        msg = msg.replace("--mpp-override", "the mpp_override field")  # the CLI's wording, said the API's way
        out = {"error": {"code": err.code, "message": msg}}
    except MemoryError:
        out = {"error": {"code": "slide_too_large", "message": "the slide needs more memory than allowed"}}
    except Exception as err:  # any other reader failure on hostile bytes is a damaged file
        out = {
            "error": {
                "code": "corrupt_slide",
                "message": f"the slide could not be read ({type(err).__name__})",
            }
        }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
