"""The one syntax check for DICOM UIDs (PS3.5 §9.1): dot-separated digit groups, 1 to 64 characters.

Used wherever a UID becomes a file name, a path or part of a message: the spool, the results folder,
retention, the listener's keys, HTTP answers and header messages. `fullmatch`, never `match` with `$`
(which accepts a trailing newline).
"""

from __future__ import annotations

import re

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_dicom_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID.

    Leading zeros in a component are tolerated (real devices emit them); what matters here is that the value
    is safe as a file name and short enough for a UI (UI) element.
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None
