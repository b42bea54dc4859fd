"""Which ONNX file of a model a precision setting runs (PTX_PRECISION), and the refusal when there is none.

A manifest lists each variant of a model as a file role with its sha256: `onnx` (FP32), `onnx_fp16` (FP16
weights and arithmetic, float32 input and output) and `onnx_int8` (static QDQ INT8, calibrated on training
films; see training/quantize.py). "auto" keeps the service's own choice (the FP16 file on a GPU provider,
the FP32 file on the CPU); the other values name a variant.

Why the check is separate from loading and runs when the models are resolved: both the HTTP edge and the
model worker resolve the models at start, so a service asked for int8 whose manifest has no INT8 file stops
there, with a message naming the model and the setting, instead of silently serving FP32 figures as INT8
ones (or failing later, in the worker only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from service.models.manifest import INT8_ROLE, Manifest, ManifestError

Precision = Literal["auto", "fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
SETTING = "PTX_PRECISION"
#: The manifest's file role that holds each precision's weights.
ROLES: dict[str, str] = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": INT8_ROLE}
_HOW_TO_MAKE = {
    "fp16": "re-export it with `python -m training export`",
    "int8": "add one with `training.export.add_int8` (calibrated on training films, see docs/models.md)",
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{SETTING} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def require_variant(manifest: Manifest, precision: str) -> None:
    """Raise ManifestError when `precision` names a variant that `manifest` does not list.

    "auto" and "fp32" always pass: every manifest has the `onnx` role.
    """
    role = ROLES.get(check_precision(precision))
    if role is None or role in manifest.files:
        return
    raise ManifestError(
        f"{SETTING}={precision}: model {manifest.name} {manifest.version} has no {precision.upper()} file "
        f"(no {role!r} role among the files of its manifest: {sorted(manifest.files)}); {_HOW_TO_MAKE[precision]}, "
        f"or set {SETTING}=auto"
    )


def variant_path(model_dir: Path, manifest: Manifest, precision: str) -> Path | None:
    """The file of `precision`'s variant in `model_dir`, or None for "auto" (the backend's own choice)."""
    if check_precision(precision) == "auto":
        return None
    require_variant(manifest, precision)
    return Path(model_dir) / manifest.files[ROLES[precision]]
