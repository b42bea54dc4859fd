"""Request bodies: one DICOM/PNG body or multipart `file` fields, refused early and specifically.

413 as soon as the body exceeds PTX_MAX_FILE_BYTES (declared or streamed), 415 for another media type,
400 for a broken multipart body, a missing file field, a client that left mid-body, or a bad parameter.
Callers hold their admission slot (`ServedCascade.admitted`) before they call `payloads`: the body is only
read once the request is admitted. A raw body is held once (no list of chunks joined into a second copy);
a multipart body is streamed through the form parser (parts over 1 MiB go to an anonymous temporary file),
so the edge never holds the whole request and its files side by side.
"""

from __future__ import annotations

import io

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from service.http.answers import ApiError
from service.settings import Settings

BODY_TYPES = ("application/dicom", "application/octet-stream", "image/png")
MASK_FORMATS = ("png", "rle", "none")


def too_large(limit: int, declared: int | None = None) -> ApiError:
    size = f"request body of {declared} bytes" if declared is not None else "request body"
    return ApiError(413, "too_large", f"{size} exceeds the limit of {limit} bytes (PTX_MAX_FILE_BYTES)")


def declared_length(request: Request, limit: int) -> int | None:
    """Content-Length, refused with 413 before anything is read when it is over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit:
        raise too_large(limit, int(declared))
    return int(declared)


class CappedReceive:
    """An ASGI `receive` that raises 413 as soon as the body it has passed on exceeds `limit` bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive, self.limit, self.size = receive, limit, 0

    async def __call__(self) -> Message:
        message = await self.receive()
        self.size += len(message.get("body", b""))
        if self.size > self.limit:
            raise too_large(self.limit)
        return message


def incomplete(size: int, declared: int | None) -> ApiError:
    """The client went away mid-body: its fault, not an internal error (found by fuzzing)."""
    return ApiError(400, "incomplete_body", f"the client closed the connection after {size} bytes of the body "
                                            f"({declared if declared is not None else 'unknown'} declared)")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` bytes (declared or streamed)."""
    declared = declared_length(request, limit)
    buffer, size = io.BytesIO(), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            buffer.write(chunk)
    except ClientDisconnect:
        raise incomplete(size, declared) from None
    return buffer.getvalue()  # the buffer's own bytes, not a copy


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def payloads(request: Request, settings: Settings, many: bool) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each uploaded file: a raw body, or multipart `file` field(s)."""
    kind = media_type(request)
    if kind in BODY_TYPES and not many:
        return [(None, await read_body(request, settings.max_file_bytes))]
    if kind != "multipart/form-data":
        accepted = "multipart/form-data" if many else f"{', '.join(BODY_TYPES)} or multipart/form-data"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {kind or 'absent'!r}; send {accepted}")
    declared = declared_length(request, settings.max_file_bytes)
    limit = settings.max_files_per_request if many else 1
    receive = CappedReceive(request.receive, settings.max_file_bytes)
    try:
        async with Request(request.scope, receive).form(max_files=limit, max_fields=limit + 8) as form:
            uploads = [item for item in form.getlist("file") if not isinstance(item, str)]
            if not uploads:
                raise ApiError(400, "missing_file", "multipart body needs a file field named 'file'")
            return [(upload.filename, await upload.read()) for upload in uploads]
    except ClientDisconnect:
        raise incomplete(receive.size, declared) from None
    except (HTTPException, MultiPartException) as exc:  # Starlette's, for a broken body and for too many files
        raise ApiError(400, "invalid_multipart", f"multipart body could not be parsed ({getattr(exc, 'detail', exc)}); "
                                                 f"at most {limit} file(s) per request") from None


def mask_format(value: str | None, settings: Settings) -> str:
    value = settings.mask_default if value is None else value
    if value not in MASK_FORMATS:
        raise ApiError(400, "invalid_parameter", f"mask={value!r}; use one of {', '.join(MASK_FORMATS)}")
    return value
