"""Request bodies: one DICOM/PNG body or multipart `file` fields, refused early and specifically.

413 as soon as the body exceeds PTX_MAX_FILE_BYTES (declared or streamed), 415 for another media type,
400 for a broken multipart body, a missing file field, a client that left mid-body, or a bad parameter.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from service.http.answers import ApiError
from service.settings import Settings

BODY_TYPES = ("application/dicom", "application/octet-stream", "image/png")
MASK_FORMATS = ("png", "rle", "none")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                         "(PTX_MAX_FILE_BYTES)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large",
                               f"request body exceeds the limit of {limit} bytes (PTX_MAX_FILE_BYTES)")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-body: its fault, not an internal error (found by fuzzing)
        raise ApiError(400, "incomplete_body", f"the client closed the connection after {size} bytes of the body "
                                               f"({declared or 'unknown'} declared)") from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 -- lets Starlette's form parser reuse the bytes already read
    return body


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
    await read_body(request, settings.max_file_bytes)
    limit = settings.max_files_per_request if many else 1
    try:
        form = await request.form(max_files=limit, max_fields=limit + 8)
    except Exception as exc:  # Starlette raises its own HTTPException / MultiPartException for both cases
        raise ApiError(400, "invalid_multipart", f"multipart body could not be parsed ({getattr(exc, 'detail', exc)}); "
                                                 f"at most {limit} file(s) per request") from None
    uploads = [item for item in form.getlist("file") if not isinstance(item, str)]
    if not uploads:
        raise ApiError(400, "missing_file", "multipart body needs a file field named 'file'")
    return [(upload.filename, await upload.read()) for upload in uploads]


def mask_format(value: str | None, settings: Settings) -> str:
    value = settings.mask_default if value is None else value
    if value not in MASK_FORMATS:
        raise ApiError(400, "invalid_parameter", f"mask={value!r}; use one of {', '.join(MASK_FORMATS)}")
    return value
