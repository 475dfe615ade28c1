"""Batched tile decoding through NVIDIA nvImageCodec: nvJPEG and nvJPEG2000 on a GPU (`tile_decoder="nvimgcodec"`),
or nvImageCodec's own CPU backends (`"nvimgcodec-cpu"`, libjpeg-turbo and OpenJPEG: the same calls, for tests and
for checking a GPU's pixels against).

Why: on NDPI, MIRAX and Aperio 33003 the patch reader is at the bound of any reader that decodes each stored
tile once on the CPU (`bench/tiling.py --breakdown`): JPEG's Huffman decoding alone is about 60 % of a block's
decode, and OpenSlide decodes each tile about once too. Only a faster decoder goes past it, and a GPU worker has
one idle beside the model (H100s also carry hardware JPEG engines).

The fast path's levels hand over complete codestreams (`stream`): a JPEG tile with the page's tables merged
in, and an Adobe APP14 segment where tifffile would tell libjpeg the colour space (Aperio's RGB-coded JPEG);
an NDPI block under its patched header; a MIRAX camera image; an Aperio 33005 JPEG 2000 tile. Aperio 33003
(chroma-subsampled components, converted with OpenSlide's tables) and anything a level cannot express as one
stream stays on the CPU path, and so does every stream this decoder rejects or decodes to another shape: that
path decodes it again and names the error, so a damaged tile fails as it does without a batch decoder.

nvImageCodec's decoders are not documented as thread-safe, so each call takes an idle one from a pool (or makes
one): as many as reader threads ever decode at once, kept for the process's later slides (reader threads
are made per slide; a decoder per thread would set up nvJPEG again for every slide). No torch: nvImageCodec's
host images are read through the buffer protocol.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidParameterError

TILE_DECODERS = ("cpu", "nvimgcodec", "nvimgcodec-cpu")
# a 16 x 16 px baseline JPEG (4:2:0, mid grey): the probe every GPU decoder must decode before it is used
_PROBE_SIDE = 16


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
        # the GPU's own decoders only: a CPU fallback inside nvImageCodec would hide a missing GPU
        gpu = (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY, nv.BackendKind.HYBRID_CPU_GPU)
        return nv.Decoder(backends=[nv.Backend(k) for k in gpu])

    @property
    def decoders(self) -> int:
        """Decoders made so far that are idle now (all of them between calls)."""
        with self._lock:
            return len(self._idle)

    def decode(self, streams: Sequence[bytes]) -> list[np.ndarray | None]:
        """One call for the whole list (a GPU decodes a batch at once); host copies, C-contiguous [H, W, 3]."""
        if not streams:
            return []
        with self._lock:
            dec = self._idle.pop() if self._idle else None
        try:  # the decoder goes back to the pool once its images are on the host
            try:
                if dec is None:  # no GPU or no nvJPEG: no decoder, and the probe fails
                    dec = self._new_decoder()
                images = dec.decode(list(streams), params=self._params)
            except Exception:  # a batch the library refuses as a whole: every stream goes back to the CPU path
                images = [None] * len(streams)
            out = [_host_rgb(im) for im in images]
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


@functools.cache
def batch_decoder(kind: str) -> BatchDecoder | None:
    """The process's decoder of `kind` (None for "cpu", the per-tile libjpeg-turbo / OpenJPEG path); made once,
    probed with a small JPEG, so a missing GPU or library is an error before any slide is read."""
    if kind == "cpu":
        return None
    return BatchDecoder(kind)
