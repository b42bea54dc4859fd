"""The one place a failure becomes an answer: `{"error": {"code", "message"}}` with its status and headers.

Every coded failure derives from `service.errors.ServiceError`; anything else is a bug, answered as a
500 `internal_error` whose log line carries the exception's type and frames but never its message (a
library's message may quote the value it choked on). Every refusal is counted in ptx_rejections_total.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from service.cascade.served import count_rejection
from service.errors import ServiceError
from service.http.schemas import error
from service.log_safety import describe_exception

log = logging.getLogger("ptx.app")


class ApiError(ServiceError):
    """A request-level refusal (media type, parameter, body): status first, as the HTTP layer thinks of it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, http_status=status, headers=headers)


def as_service_error(exc: BaseException, doing: str, message: str) -> ServiceError:
    """`exc` itself when it is coded; otherwise a 500 `internal_error` with `message`, logged as
    "`doing` failed: <type and frames>" (never the exception's own message)."""
    if isinstance(exc, ServiceError):
        return exc
    log.error("%s failed: %s", doing, describe_exception(exc, depth=12))
    return ServiceError(message)


def error_answer(exc: ServiceError) -> JSONResponse:
    """The answer for a refused request, counted as a rejection under its code."""
    count_rejection(exc.code_text)
    return error(exc.code_text, exc.message, exc.http_status, exc.headers)
