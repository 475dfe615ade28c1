"""JPEG 2000 codestreams decoded by OpenJPEG (libopenjp2) through ctypes, to the stored components.

Why not Pillow or imagecodecs: Pillow's JPEG 2000 decoder keeps the GIL for the whole decode (it reads its
input through Python), so the reader threads of an Aperio 33003 slide decoded on one core (21.9 vs 22.1
tiles/s on one and two threads); imagecodecs releases the GIL but converts subsampled YCbCr to RGB itself,
with rounding OpenSlide does not use. ctypes releases the GIL around each OpenJPEG call, and this returns the
components as stored (chroma at its stored width) so the caller applies OpenSlide's conversion.

The library is the libopenjp2 that Pillow's wheel bundles (the one Pillow itself decodes with), else the
system's; `available()` is False where neither loads, and callers keep their Pillow path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import threading
from pathlib import Path

import numpy as np

J2K_CODESTREAM = 0  # OPJ_CODEC_J2K: a raw codestream (what Aperio stores in each TIFF tile)
_STREAM_CHUNK = 1 << 20
_PARAMS_BYTES = 1 << 14  # opj_dparameters_t is ~8.3 KB (two 4,096-byte paths); filled by the library itself


class _Component(ctypes.Structure):  # opj_image_comp_t (OpenJPEG 2.x)
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):  # opj_image_t (OpenJPEG 2.x)
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_END_OF_STREAM = ctypes.c_size_t(-1).value

# One decode at a time per stream object; the callbacks find it by the id passed as OpenJPEG's user data,
# so the C callbacks are made once (making them per call costs more than reading a small codestream).
_streams: dict[int, _MemoryStream] = {}
_streams_lock = threading.Lock()


class _MemoryStream:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.errors: list[str] = []


def _stream(user: int | None) -> _MemoryStream:
    return _streams[user or 0]


@_READ
def _read(dst: int, size: int, user: int | None) -> int:
    s = _stream(user)
    n = min(size, len(s.data) - s.pos)
    if n <= 0:
        return _END_OF_STREAM
    ctypes.memmove(dst, s.data[s.pos : s.pos + n], n)
    s.pos += n
    return n


@_SKIP
def _skip(size: int, user: int | None) -> int:
    s = _stream(user)
    n = max(-s.pos, min(size, len(s.data) - s.pos))
    s.pos += n
    return n


@_SEEK
def _seek(pos: int, user: int | None) -> int:
    s = _stream(user)
    if not 0 <= pos <= len(s.data):
        return 0
    s.pos = pos
    return 1


@_MESSAGE
def _error(message: bytes | None, user: int | None) -> None:
    s = _streams.get(user or 0)
    if s is not None and message:
        s.errors.append(message.decode(errors="replace").strip())


def _candidates() -> list[str]:
    """Pillow's bundled libopenjp2 first (the decoder the Pillow path used, present wherever Pillow's wheel
    is), then the system's."""
    import PIL

    site = Path(PIL.__file__).resolve().parent
    found = sorted(glob.glob(str(site.parent / "pillow.libs" / "libopenjp2*")))
    found += sorted(glob.glob(str(site / ".dylibs" / "libopenjp2*")))
    system = ctypes.util.find_library("openjp2")
    return found + ([system] if system else [])


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MSTAR_NO_CTYPES_OPENJPEG"):
        return None
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            _declare(lib)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _declare(lib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    lib.opj_version.restype = ctypes.c_char_p
    lib.opj_stream_create.restype = vp
    lib.opj_stream_create.argtypes = [ctypes.c_size_t, ctypes.c_int]
    for fn in ("opj_stream_set_read_function", "opj_stream_set_skip_function", "opj_stream_set_seek_function"):
        getattr(lib, fn).argtypes = [vp, vp]
    lib.opj_stream_set_user_data.argtypes = [vp, vp, vp]
    lib.opj_stream_set_user_data_length.argtypes = [vp, ctypes.c_uint64]
    lib.opj_create_decompress.restype = vp
    lib.opj_create_decompress.argtypes = [ctypes.c_int]
    lib.opj_set_error_handler.argtypes = [vp, vp, vp]
    lib.opj_set_default_decoder_parameters.argtypes = [vp]
    lib.opj_setup_decoder.argtypes = [vp, vp]
    lib.opj_read_header.argtypes = [vp, vp, ctypes.POINTER(ctypes.POINTER(_Image))]
    lib.opj_decode.argtypes = [vp, vp, ctypes.POINTER(_Image)]
    lib.opj_end_decompress.argtypes = [vp, vp]
    lib.opj_destroy_codec.argtypes = [vp]
    lib.opj_stream_destroy.argtypes = [vp]
    lib.opj_image_destroy.argtypes = [ctypes.POINTER(_Image)]


def available() -> bool:
    return _library() is not None


def version() -> str | None:
    lib = _library()
    return lib.opj_version().decode() if lib is not None else None


def decode_components(
    codestream: bytes, reduce: int = 0, expect_size: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """The components of a raw J2K codestream as uint8 arrays [h, w] at their stored size (subsampled chroma
    stays subsampled), at 1 / 2**reduce resolution: OpenJPEG stops the inverse wavelet transform early. Any
    inverse component transform the codestream asks for is applied. ValueError on damaged data, fewer
    resolution levels than `reduce`, components that are not 8-bit unsigned, or a header whose full-resolution
    (width, height) is not `expect_size`: that is checked before anything is decoded, so a damaged or hostile
    tile header cannot make OpenJPEG allocate a huge image."""
    lib = _library()
    if lib is None:
        raise RuntimeError("no libopenjp2 could be loaded")
    stream = _MemoryStream(bytes(codestream))
    key = id(stream)
    with _streams_lock:
        _streams[key] = stream
    st = lib.opj_stream_create(_STREAM_CHUNK, 1)
    codec = lib.opj_create_decompress(J2K_CODESTREAM)
    image = ctypes.POINTER(_Image)()
    try:
        if not st or not codec:
            raise MemoryError("OpenJPEG could not allocate a decoder")
        lib.opj_stream_set_read_function(st, ctypes.cast(_read, ctypes.c_void_p))
        lib.opj_stream_set_skip_function(st, ctypes.cast(_skip, ctypes.c_void_p))
        lib.opj_stream_set_seek_function(st, ctypes.cast(_seek, ctypes.c_void_p))
        lib.opj_stream_set_user_data(st, key, None)
        lib.opj_stream_set_user_data_length(st, len(stream.data))
        lib.opj_set_error_handler(codec, ctypes.cast(_error, ctypes.c_void_p), key)
        params = ctypes.create_string_buffer(_PARAMS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        ctypes.c_uint32.from_buffer(params).value = max(0, int(reduce))  # cp_reduce, the struct's first field
        if not (lib.opj_setup_decoder(codec, params) and lib.opj_read_header(st, codec, ctypes.byref(image))):
            raise ValueError("; ".join(stream.errors) or "OpenJPEG could not read the codestream header")
        head = image.contents
        size = (head.x1 - head.x0, head.y1 - head.y0)
        if expect_size is not None and size != tuple(expect_size):
            raise ValueError(f"codestream header says {size[0]}x{size[1]} px, not {expect_size[0]}x{expect_size[1]}")
        if not (lib.opj_decode(codec, st, image) and lib.opj_end_decompress(codec, st)):
            raise ValueError("; ".join(stream.errors) or "OpenJPEG could not decode the codestream")
        return _components(image.contents)
    finally:
        if image:
            lib.opj_image_destroy(image)
        if codec:
            lib.opj_destroy_codec(codec)
        if st:
            lib.opj_stream_destroy(st)
        with _streams_lock:
            _streams.pop(key, None)


def _components(image: _Image) -> list[np.ndarray]:
    out = []
    for i in range(image.numcomps):
        comp = image.comps[i]
        if comp.prec != 8 or comp.sgnd:
            raise ValueError(f"component {i} is {comp.prec}-bit {'signed' if comp.sgnd else 'unsigned'}, not 8-bit")
        if not comp.data or comp.w == 0 or comp.h == 0:
            raise ValueError(f"component {i} has no decoded data")
        plane = np.ctypeslib.as_array(comp.data, shape=(comp.h, comp.w))
        out.append(plane.astype(np.uint8))  # 8-bit unsigned samples are 0..255 already
    return out
