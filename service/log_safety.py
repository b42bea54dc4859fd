"""Exceptions described for logs without their messages.

An exception's message may quote the data it choked on: pydicom and the decoders put attribute values in
theirs ("invalid value for VR PN: 'DOE^JOHN'"), so a traceback logged as is can carry a patient's name into
the logs. What a bug report needs is where it happened: the exception's type and the frames it went
through (files, lines, functions: our code and the libraries', never data). This is what the service logs
for errors it did not expect; the messages of errors it raises itself are written not to carry patient
data (docs/security.md, "Logging policy").
"""

from __future__ import annotations

import traceback


def describe_exception(exc: BaseException, depth: int = 1) -> str:
    """`TypeName at file.py:LINE in function`, then up to `depth - 1` outer frames (`< file.py:LINE in f`);
    the innermost frame first. Chained causes are described the same way after "caused by"."""
    frames = traceback.extract_tb(exc.__traceback__)[::-1][:max(1, depth)]
    where = " < ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}" for frame in frames)
    text = f"{type(exc).__module__}.{type(exc).__qualname__}" if type(exc).__module__ != "builtins" \
        else type(exc).__qualname__
    text += f" at {where}" if where else ""
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None and depth > 1:
        text += f"; caused by {describe_exception(cause, depth=min(depth, 3))}"
    return text
