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

One decoder per reader thread (nvImageCodec's decoders are not documented as thread-safe); each is created on
first use. No torch: nvImageCodec's host images are read through the buffer protocol.
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


def _nvimgcodec():
    """The nvImageCodec module, or an error that says how to install it."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # its CPU JPEG 2000 backend warns on every codestream
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise InvalidParameterError(
            "tile_decoder nvimgcodec needs NVIDIA nvImageCodec: pip install 'mstar[gpu-decode]' "
            f"(nvidia-nvimgcodec-cu12 with nvJPEG and nvJPEG2000) ({exc})"
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
        if kind not in TILE_DECODERS[1:]:
            raise InvalidParameterError(f"tile_decoder must be one of {', '.join(TILE_DECODERS)}, got {kind!r}")
        self.kind = kind
        self._nv = _nvimgcodec()
        nv = self._nv
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
        self._local = threading.local()
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

    def _decoder(self):
        dec = getattr(self._local, "decoder", None)
        if dec is None:
            nv = self._nv
            if self.kind == "nvimgcodec-cpu":
                dec = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
            else:  # the GPU's own decoders only: a CPU fallback inside nvImageCodec would hide a missing GPU
                gpu = (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY, nv.BackendKind.HYBRID_CPU_GPU)
                dec = nv.Decoder(backends=[nv.Backend(k) for k in gpu])
            self._local.decoder = dec
        return dec

    def decode(self, streams: Sequence[bytes]) -> list[np.ndarray | None]:
        """One call for the whole list (a GPU decodes a batch at once); host copies, C-contiguous [H, W, 3]."""
        if not streams:
            return []
        try:
            images = self._decoder().decode(list(streams), params=self._params)
        except Exception:  # a batch the library refuses as a whole: every stream goes back to the CPU path
            images = [None] * len(streams)
        out: list[np.ndarray | None] = []
        for im in images:
            arr = None
            if im is not None:
                try:
                    arr = np.asarray(im.cpu() if self.kind == "nvimgcodec" else im)
                except Exception:
                    arr = None
            if arr is not None and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] in (1, 3):
                arr = np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
            else:
                arr = None
            out.append(arr)
        with self._lock:
            ok = sum(a is not None for a in out)
            self.decoded += ok
            self.rejected += len(out) - ok
        return out


@functools.cache
def batch_decoder(kind: str) -> BatchDecoder | None:
    """The process's decoder of `kind` (None for "cpu", the per-tile libjpeg-turbo / OpenJPEG path); made once,
    probed with a small JPEG, so a missing GPU or library is an error before any slide is read."""
    if kind == "cpu":
        return None
    return BatchDecoder(kind)
