"""The HTTP edge (BentoML). Thin by design: it parses requests and answers; plain modules decide everything.

Today it decodes and validates radiographs (`POST /v1/inspect`), so a PACS team can check what the service
will make of their files. Triage (`POST /v1/triage`) arrives with the model pipeline. BentoML itself serves
`/healthz`, `/livez`, `/readyz` and `/metrics`.
"""

from __future__ import annotations

import bentoml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.imaging import read_radiograph
from service.radiograph import RadiographError

BODY_TYPES = ("application/dicom", "application/octet-stream", "image/png")


def error(code: str, message: str, status: int) -> JSONResponse:
    """Every error has one shape: {"error": {"code", "message"}}."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _payload(request: Request) -> bytes | JSONResponse:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return error("missing_file", "multipart body needs a file field named 'file'", 400)
        return await upload.read()
    if media_type in BODY_TYPES:
        return await request.body()
    return error(
        "unsupported_media_type",
        f"Content-Type {media_type or 'absent'!r}; send {', '.join(BODY_TYPES)} or multipart/form-data",
        415,
    )


async def inspect(request: Request) -> JSONResponse:
    """Decode and validate one radiograph; answer its metadata, or the rejection with its code."""
    payload = await _payload(request)
    if isinstance(payload, JSONResponse):
        return payload
    try:
        radiograph = await run_in_threadpool(read_radiograph, payload)  # decoding is CPU work: off the loop
    except RadiographError as exc:
        return error(exc.code.value, exc.message, exc.http_status)
    return JSONResponse(radiograph.metadata())


http = Starlette(routes=[Route("/inspect", inspect, methods=["POST"])])


@bentoml.service(name="ptx-triage", traffic={"timeout": 60})
@bentoml.asgi_app(http, path="/v1")
class Triage:
    """The service. Ready as soon as it starts while it holds no models."""

    def __is_ready__(self) -> bool:
        return True
