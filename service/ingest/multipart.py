"""The multipart source of ingest: a `POST /slides` body streamed straight into blob-store staging.

Starlette's `request.form()` spools the whole body before the handler runs and has no total cap, so the
upload route parses the stream itself (python-multipart's push parser): file bytes go to a staging file in
the blob store in chunks with a byte counter and a running SHA-256; past the cap the file is dropped at once
and at most `upload_drain_bytes` more are read so the client gets the 413 rather than a reset connection.
A body that sends nothing for `upload_idle_timeout_s` is dropped (400), as is one whose closing boundary never
comes (a truncated body must not become a slide). Nothing here touches the database: a stalled client holds a
socket and a staging file, never a connection others need.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.config import Settings
from service.errors import InvalidParameterError, MstarError, SlideTooLargeError
from service.ingest.disk import disk_full_as_error
from service.store.blobs import BlobStore, BlobWriter

FILE_FIELD = "file"
TEXT_FIELDS = ("analyze", "mpp_override", "source")  # source: an s3:// URI instead of `file`
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8
FLUSH_BYTES = 1 << 20


class RequestError(MstarError):
    """A malformed request body (multipart syntax, a stalled or cut-off body)."""

    code = "invalid_request"
    http_status = 400


class UnsupportedMediaTypeError(MstarError):
    code = "unsupported_media_type"
    http_status = 415


@dataclass
class ParsedUpload:
    writer: BlobWriter | None = None
    fields: dict[str, str] = field(default_factory=dict)
    too_large: bool = False
    received: int = 0


async def receive_upload(request: Request, blobs: BlobStore, settings: Settings) -> ParsedUpload:
    """Parse the multipart body; the caller must `discard()` or `commit()` the returned writer."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaTypeError("upload the slide as multipart/form-data with a `file` part")
    cap = settings.upload_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap + settings.upload_drain_bytes + (1 << 20):
        raise SlideTooLargeError(f"upload of {int(declared)} bytes exceeds the limit of {cap} bytes")

    out = ParsedUpload()
    cur: dict = {"headers": {}, "name": None, "is_file": False, "buf": bytearray(), "hf": b"", "hv": b""}
    parts = {"n": 0}

    def on_part_begin() -> None:
        parts["n"] += 1
        if parts["n"] > MAX_PARTS:
            raise RequestError(f"too many multipart parts (at most {MAX_PARTS})")
        cur.update(headers={}, name=None, is_file=False, buf=bytearray(), hf=b"", hv=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["hf"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["hv"] += data[start:end]

    def on_header_end() -> None:
        cur["headers"][cur["hf"].lower()] = cur["hv"]
        cur["hf"], cur["hv"] = b"", b""

    def on_headers_finished() -> None:
        disp, opts = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if disp != b"form-data" or not name:
            raise RequestError("each multipart part needs `Content-Disposition: form-data; name=...`")
        if name != FILE_FIELD and name not in TEXT_FIELDS:  # a misspelt `analyze` or `mpp_override` was dropped
            raise InvalidParameterError(
                f"unknown form field {name[:64]!r}; this upload takes `{FILE_FIELD}` and {', '.join(TEXT_FIELDS)}"
            )
        cur["name"] = name
        cur["is_file"] = name == FILE_FIELD
        if cur["is_file"]:
            if out.writer is not None or out.too_large:
                raise RequestError("send exactly one `file` part")
            out.writer = blobs.writer()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        n = end - start
        if cur["is_file"]:
            if out.too_large:
                return
            if out.writer.size + n > cap:
                out.too_large = True
                out.writer.discard()
                out.writer = None
                return
            out.writer.write(data[start:end])
        else:
            cur["buf"] += data[start:end]
            if len(cur["buf"]) > MAX_FIELD_BYTES:
                raise RequestError(f"form field {cur['name']!r} is too long")

    def on_part_end() -> None:
        if not cur["is_file"]:
            out.fields[cur["name"]] = cur["buf"].decode("utf-8", "replace").strip()

    try:
        parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
            },
        )
    except FormParserError as err:  # a boundary over 256 characters (was a 500)
        raise RequestError(f"malformed multipart boundary ({err})") from None
    idle = settings.upload_idle_timeout_s
    chunks = request.stream()
    pending = bytearray()

    async def flush() -> None:
        # parsing, hashing and writing run on a worker thread in ~1 MiB steps: the event loop only moves bytes
        if pending:
            data = bytes(pending)
            pending.clear()
            await asyncio.to_thread(parser.write, data)

    try:
        with disk_full_as_error("receiving the upload"):
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestError(
                        f"the upload sent nothing for {idle:g} s and was dropped; send the body without pauses"
                    ) from None
                out.received += len(chunk)
                if out.too_large:
                    if out.received - cap > settings.upload_drain_bytes:
                        break
                    continue
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    await flush()
            if not out.too_large:
                await flush()
        if not out.too_large:
            parser.finalize()
            if parser.state != MultipartState.END:
                raise RequestError(
                    "the multipart body ended without its closing boundary (`--boundary--`): it was cut off"
                )
    except MultipartParseError as err:
        _drop(out)
        raise RequestError(f"malformed multipart body ({type(err).__name__})") from None
    except ClientDisconnect:
        _drop(out)
        raise RequestError("the client disconnected during the upload") from None
    except BaseException:
        _drop(out)
        raise
    finally:
        await chunks.aclose()
    if out.too_large:
        raise SlideTooLargeError(f"upload exceeds the limit of {cap} bytes")
    if out.writer is not None:
        try:
            with disk_full_as_error("receiving the upload"):
                await asyncio.to_thread(out.writer.close)  # fsync: never on the event loop
        except BaseException:
            _drop(out)
            raise
    return out


def _drop(out: ParsedUpload) -> None:
    if out.writer is not None:
        out.writer.discard()
        out.writer = None


def parse_bool(value: str | None, name: str, default: bool) -> bool:
    if value is None or value == "":
        return default
    # exactly the OpenAPI boolean spellings: a form field the schema calls boolean accepts nothing else
    v = value.lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise InvalidParameterError(f"{name} must be true or false, got {value[:20]!r}")


def parse_mpp(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    from service.slides.mpp import override_mpp

    return override_mpp(value[:32]).x
