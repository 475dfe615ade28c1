"""Batched tile decoding through NVIDIA nvImageCodec: nvJPEG and nvJPEG2000 on a GPU (`tile_decoder="nvimgcodec"`),
or nvImageCodec's own CPU backends (`"nvimgcodec-cpu"`, libjpeg-turbo and OpenJPEG: the same calls, for tests and
for checking a GPU's pixels against).

Why: on NDPI, MIRAX and Aperio 33003 the patch reader is at the bound of any reader that decodes each stored
tile once on the CPU (`bench/tiling.py --breakdown`): JPEG's Huffman decoding alone is about 60 % of a block's
decode, and OpenSlide decodes each tile about once too. Only a faster decoder goes past it, and a GPU worker has
one idle beside the model (H100s also carry hardware JPEG engines).

The fast path's levels hand over complete codestreams (`stream`): a JPEG tile with the page's tables merged
in, and an Adobe APP14 segment where tifffile would tell libjpeg the colour space (Aperio's RGB-coded JPEG);
an NDPI block under its patched header; a MIRAX camera image; an Aperio JPEG 2000 tile. Anything a level
cannot express as one stream stays on the CPU path, and so does every stream this decoder rejects or decodes to
another shape: that path decodes it again and names the error, so a damaged tile fails as it does without a
batch decoder.

No layout is trusted unchecked: a decoder can be right on one stream layout and wrong on another (nvJPEG may
ignore the Adobe marker that makes Aperio's RGB-coded JPEG RGB; decoders upsample chroma their own ways). The
first time a process's decoder meets a layout (`headers.stream_layout`: codec, sampling, colour transform), the
fast path decodes a few of those tiles on the CPU too and asks `BatchDecoder.judge`; a layout whose pixels are
further from the CPU path's than `CHECK_MAX_DIFF` / `CHECK_MEAN_DIFF` is refused for the process's life (its
tiles take the CPU path, a warning names it, and each result's provenance lists the verdicts it read under).
Aperio 33003 is decoded to its stored planes (YCbCr, chroma at its own size) and converted on the CPU with
OpenSlide's tables, as the CPU path does; decoders that cannot hand the planes back fail that check.

nvImageCodec's decoders are not documented as thread-safe, so each call takes an idle one from a pool (or makes
one): as many as reader threads ever decode at once, kept for the process's later slides (reader threads
are made per slide; a decoder per thread would set up nvJPEG again for every slide). No torch: nvImageCodec's
host images are read through the buffer protocol.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidParameterError

log = logging.getLogger(__name__)

TILE_DECODERS = ("cpu", "nvimgcodec", "nvimgcodec-cpu")
# a 16 x 16 px baseline JPEG (4:2:0, mid grey): the probe every GPU decoder must decode before it is used
_PROBE_SIDE = 16
# a layout's first tiles through both decoders: how many, and how far apart the batch decoder's pixels may be.
# IDCTs and chroma upsampling differ by a few levels, most at sharp colour edges (tens there with another
# 4:2:0 upsampling); a wrong colour transform is tens of levels off on average
CHECK_TILES = 3
CHECK_MAX_DIFF = 48
CHECK_MEAN_DIFF = 1.5


def check_decoder(kind: str) -> str:
    """`kind` where it names a tile decoder, else the error every caller gives (settings, readers, tests)."""
    if kind not in TILE_DECODERS:
        raise InvalidParameterError(f"tile_decoder must be one of {', '.join(TILE_DECODERS)}, got {kind!r}")
    return kind


def _nvimgcodec(kind: str):
    """The nvImageCodec module, or an error that says how to install it."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # its CPU JPEG 2000 backend warns on every codestream
    if kind == "nvimgcodec-cpu":  # its GPU extensions' load errors are expected there (the GPU kind keeps them)
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise InvalidParameterError(
            "tile_decoder nvimgcodec needs NVIDIA nvImageCodec: pip install 'mstar[gpu-decode]' "
            f"(nvidia-nvimgcodec-cu13 with nvJPEG and nvJPEG2000) ({exc})"
        ) from None
    return nvimgcodec


def _probe_jpeg() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((_PROBE_SIDE, _PROBE_SIDE, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


class BatchDecoder:
    """Decodes lists of codestreams into uint8 RGB host arrays, `None` where a stream was not decoded."""

    def __init__(self, kind: str) -> None:
        if check_decoder(kind) == "cpu":
            raise InvalidParameterError("tile_decoder cpu decodes tile by tile: it has no batch decoder")
        self.kind = kind
        self._nv = _nvimgcodec(kind)
        nv = self._nv
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
        # stored planes, no colour conversion: [3, H, W], each subsampled component in its plane's top-left
        self._planar_params = nv.DecodeParams(
            apply_exif_orientation=False, color_spec=nv.ColorSpec.SYCC, sample_format=nv.SampleFormat.P_YUV
        )
        self._verdicts: dict[str, dict] = {}  # stream layout -> the check's outcome (`judge`)
        self._idle: list = []  # decoders no call is using
        self._lock = threading.Lock()
        self.decoded = 0  # streams decoded here, and streams handed back to the CPU path
        self.rejected = 0
        probe = self.decode([_probe_jpeg()])[0]
        if probe is None or probe.shape != (_PROBE_SIDE, _PROBE_SIDE, 3):
            where = "a CUDA GPU with nvJPEG (pip install 'mstar[gpu-decode]')" if kind == "nvimgcodec" else "its CPU"
            raise InvalidParameterError(
                f"tile_decoder {kind} cannot decode a JPEG on this machine: it needs {where}; "
                "use tile_decoder cpu (MSTAR_TILE_DECODER=cpu) where there is none"
            )
        self.decoded = self.rejected = 0

    def _new_decoder(self):
        nv = self._nv
        if self.kind == "nvimgcodec-cpu":
            return nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
        # the GPU's own decoders only: a CPU fallback inside nvImageCodec would hide a missing GPU; chroma
        # upsampled as libjpeg-turbo does by default (unknown options are ignored; the layout check measures it)
        backends = [
            nv.Backend(k) for k in (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY, nv.BackendKind.HYBRID_CPU_GPU)
        ]
        try:
            return nv.Decoder(backends=backends, options=":fancy_upsampling=1")
        except Exception:  # a library that refuses the option still decodes; the check measures its upsampling
            return nv.Decoder(backends=backends)

    @property
    def decoders(self) -> int:
        """Decoders made so far that are idle now (all of them between calls)."""
        with self._lock:
            return len(self._idle)

    def verdict(self, layout: str) -> dict | None:
        """The check's outcome for a stream layout (`judge`), or None before its first tiles were checked."""
        with self._lock:
            return self._verdicts.get(layout)

    @property
    def verdicts(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._verdicts.items()}

    def judge(self, layout: str, pairs: Sequence[tuple[np.ndarray | None, np.ndarray]]) -> dict:
        """Record whether this decoder's pixels on `layout` may stand in for the CPU path's, from `pairs` of
        (its image or None where it handed the tile back, the CPU path's image) of the layout's first tiles;
        the first verdict on a layout stands for the process. Returns the verdict: `accepted`, `tiles`,
        `max_diff` / `mean_diff` (levels, 0-255) where it decoded them, `reason` where refused."""
        done = [(a, b) for a, b in pairs if a is not None and a.shape == b.shape]
        if len(done) < len(pairs) or not done:  # a tile it cannot decode is one the CPU path decodes
            reason = f"it decoded {len(done)} of {len(pairs)} tiles that the CPU path decodes"
            verdict = {"accepted": False, "tiles": len(pairs), "reason": reason}
        else:
            diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in done]
            worst, mean = max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
            verdict = {
                "accepted": worst <= CHECK_MAX_DIFF and mean <= CHECK_MEAN_DIFF,
                "tiles": len(done),
                "max_diff": worst,
                "mean_diff": round(mean, 3),
            }
            if not verdict["accepted"]:
                verdict["reason"] = (
                    f"its pixels are up to {worst} levels (mean {mean:.2f}) from the CPU path's; allowed "
                    f"{CHECK_MAX_DIFF} (mean {CHECK_MEAN_DIFF})"
                )
        with self._lock:
            first = layout not in self._verdicts
            verdict = self._verdicts.setdefault(layout, verdict)
        if first and not verdict["accepted"]:
            log.warning("tile_decoder %s: %s tiles take the CPU path: %s", self.kind, layout, verdict["reason"])
        return dict(verdict)

    def decode(self, streams: Sequence[bytes], planar: bool = False) -> list[np.ndarray | None]:
        """One call for the whole list (a GPU decodes a batch at once); host copies, C-contiguous [H, W, 3],
        or with `planar` the stored components unconverted, [3, H, W]."""
        if not streams:
            return []
        with self._lock:
            dec = self._idle.pop() if self._idle else None
        try:  # the decoder goes back to the pool once its images are on the host
            try:
                if dec is None:  # no GPU or no nvJPEG: no decoder, and the probe fails
                    dec = self._new_decoder()
                images = dec.decode(list(streams), params=self._planar_params if planar else self._params)
            except Exception:  # a batch the library refuses as a whole: every stream goes back to the CPU path
                images = [None] * len(streams)
            out = [_host_planes(im) if planar else _host_rgb(im) for im in images]
        finally:
            if dec is not None:
                with self._lock:
                    self._idle.append(dec)
        with self._lock:
            ok = sum(a is not None for a in out)
            self.decoded += ok
            self.rejected += len(out) - ok
        return out


def _host_rgb(im) -> np.ndarray | None:
    """A decoded image as a C-contiguous uint8 [H, W, 3] host array (grey repeated), or None."""
    if im is None:
        return None
    try:
        arr = np.asarray(im.cpu())  # a copy off the GPU; a host image as it is
    except Exception:
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        return None
    return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)


def _host_planes(im) -> np.ndarray | None:
    """A planar decode as a C-contiguous uint8 [3, H, W] host array, or None."""
    if im is None:
        return None
    try:
        arr = np.asarray(im.cpu())
    except Exception:
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != 3:
        return None
    return np.ascontiguousarray(arr)


@functools.cache
def batch_decoder(kind: str) -> BatchDecoder | None:
    """The process's decoder of `kind` (None for "cpu", the per-tile libjpeg-turbo / OpenJPEG path); made once,
    probed with a small JPEG, so a missing GPU or library is an error before any slide is read."""
    if kind == "cpu":
        return None
    return BatchDecoder(kind)
