"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): our binary bodies, sent as they are."""

from __future__ import annotations

import schemathesis


@schemathesis.serializer("application/dicom", "image/png")
def binary(context: schemathesis.SerializationContext, value: object) -> dict[str, bytes]:
    """The document declares these bodies as binary strings."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}
