"""The HTTP API's documented shapes (OpenAPI), kept next to each other so the page and the code agree.

Responses are built by `Finding.to_json` and `service.app.error`; these models describe them for the
OpenAPI page (BentoML merges the FastAPI edge's schema into `/docs.json`), and a test checks real responses
against them, so the documentation cannot drift from what the service sends.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

DICOM_BODY = {
    "required": True,
    "content": {
        "application/dicom": {"schema": {"type": "string", "format": "binary"},
                              "example": "(a DICOM Part 10 file: CR, DX or Secondary Capture chest radiograph)"},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
    },
}

BATCH_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                "description": "one `file` field per film (PTX_MAX_FILES_PER_REQUEST at most)"}}}}},
}


def error_content(code: str, message: str) -> dict[str, dict[str, str]]:
    """Every error the API sends has one shape: {"error": {"code", "message"}} (`ErrorOut`)."""
    return {"error": {"code": code, "message": message}}


def error(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_content(code, message), status_code=status, headers=headers)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    code: str = Field(description="stable machine code, e.g. not_dicom, too_large, not_chest, multi_frame, colour, "
                                  "corrupt_pixel_data, degenerate_image, unsupported_media_type, invalid_parameter, "
                                  "sop_uid_conflict, overloaded, shutting_down, not_found, not_on_this_replica")
    message: str = Field(description="what was wrong: which tag or which limit (never patient data)")


class ErrorOut(_Out):
    error: ErrorDetail


class InstanceOut(_Out):
    bbox_px: list[int] = Field(description="[x, y, width, height] in pixels of the original film")
    bbox_mm: list[float] | None = Field(description="the same box in mm (None when the pixel spacing is unknown)")
    area_px: int
    area_mm2: float | None
    centroid_px: list[float] = Field(description="[x, y]")


class ModelOut(_Out):
    name: str
    version: str
    backend: str | None = Field(description="engine, e.g. onnxruntime-cpu, onnxruntime-cuda, torch-cuda-fp16")
    members: list[str] | None = Field(default=None, description="an ensemble's members (version and training run), "
                                                              "whose probabilities the model averages")


class OodOut(_Out):
    distance: float = Field(description="Mahalanobis distance of the film's classifier features from the training "
                                        "films'")
    threshold: float = Field(description="beyond it the film is out of distribution (the classifier manifest's "
                                         "ood.threshold)")
    flag: bool


class TriageOut(_Out):
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    score: float = Field(ge=0, le=1, description="triage score at PTX_PREVALENCE: the classifier's probability "
                                                 "calibrated (or fused with the segmenter's evidence) where the "
                                                 "classifier's manifest has a `fusion`, else its probability as is")
    label: Literal["pneumothorax", "no_pneumothorax"] = Field(description="score ≥ threshold")
    priority: Literal["STAT", "URGENT", "ROUTINE"]
    threshold: float = Field(description="operating point on score (from the classifier's manifest)")
    rle: str | None = Field(default=None, description="SIIM RLE (relative, column-major) of the mask; '-1' if "
                                                      "empty; absent with ?mask=none")
    mask_png: str | None = Field(default=None, description="base64 1-bit PNG at the film's resolution (?mask=png)")
    instances: list[InstanceOut]
    warnings: list[str]
    ood: OodOut | None = Field(description="out-of-distribution reading; null when the classifier's manifest has "
                                           "none")
    needs_review: bool = Field(description="out of distribution: warning out_of_distribution, priority capped at "
                                           "PTX_OOD_MAX_PRIORITY")
    models: dict[str, ModelOut]
    timings_ms: dict[str, float] = Field(description="decode, preprocess, classify, segment (gated films only), "
                                                     "postprocess, total")


class BatchItemOut(_Out):
    """One film's result (the fields of TriageOut) or its `error`, with the uploaded file's name."""

    model_config = ConfigDict(extra="allow")
    filename: str | None
    error: ErrorDetail | None = None


class BatchOut(_Out):
    results: list[BatchItemOut]


ERRORS = {
    400: {"model": ErrorOut, "description": "not DICOM, bad multipart body, or invalid parameter"},
    413: {"model": ErrorOut, "description": "body or image larger than the configured limit"},
    409: {"model": ErrorOut, "description": "sop_uid_conflict: with PTX_RECORD_HTTP, a SOP Instance UID already "
                                            "recorded for another study or other bytes (the first film is kept)"},
    415: {"model": ErrorOut, "description": "unsupported Content-Type"},
    422: {"model": ErrorOut, "description": "a radiograph the service refuses (the code says why: not_chest, "
                                            "multi_frame, colour, not_radiograph, corrupt_pixel_data, ...)"},
    503: {"model": ErrorOut, "description": "overloaded, shutting down or model worker unavailable; see the "
                                            "Retry-After header"},
}
