"""One root for every coded failure, and one enum for every warning code.

Every error the service can answer with derives from `ServiceError`: a stable machine `code`, an
`http_status`, a message that names the tag or limit (never a patient attribute) and optional headers
(Retry-After). `service.http.answers.error_answer` turns any of them into the one answer shape
`{"error": {"code", "message"}}`; the PACS side maps the same codes to DICOM statuses. Rooms subclass it
for their own failures (imaging's `RadiographError`, the store's `StoreError`, delivery's `DeliveryError`,
models' `ModelUnavailable`...), so a caller catches one type and answers one way.

Warnings do not stop a film; they travel with its finding. They are one enum, whichever room raises them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class ServiceError(Exception):
    """A failure with a stable `code` and the HTTP status it is answered with."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def code_text(self) -> str:
        """The code as answered (an enum member gives its value)."""
        return str(getattr(self.code, "value", self.code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code_text!r}, {self.message!r})"


def unavailable(code: str, message: str, retry_after_s: int) -> ServiceError:
    """A 503 the client may retry after `retry_after_s` (a model out of service, an overloaded edge)."""
    return ServiceError(message, code=code, http_status=503, headers={"Retry-After": str(retry_after_s)})


class WarningCode(str, Enum):
    """Every warning code an answer can carry: the film is triaged, the reader is told what to doubt."""

    APPEARS_INVERTED = "appears_inverted"
    SPACING_UNKNOWN = "spacing_unknown"
    INVALID_WINDOW = "invalid_window"
    NON_FRONTAL_VIEW = "non_frontal_view"
    FOR_PROCESSING = "for_processing"
    TRANSFER_SYNTAX_INFERRED = "transfer_syntax_inferred"
    MM_MORPHOLOGY_SKIPPED = "mm_morphology_skipped_spacing_unknown"
    SIZE_UNKNOWN_SPACING = "size_unknown_spacing"
    WINDOW_MISMATCH = "window_mismatch"  # the file's window/VOI LUT hid the film: a data-derived one was used
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # unlike the classifier's training films: priority capped, review
