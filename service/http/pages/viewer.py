"""A study's link into the site's own image viewer (issue 14 §2), from one URL template setting.

    PTX_VIEWER_URL=https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}

Why a template and no per-viewer code: every viewer the sites use (OHIF, Orthanc Explorer 2, a vendor's
PACS client) opens a study from a URL that carries its Study Instance UID somewhere; only where differs.
The template is checked before its first use, with a message naming the setting, rather than producing
broken links: `{study_uid}` must appear, no other `{...}` field may, and the URL must be http(s) or a path
on this host. The UID is URL-quoted (a DICOM UID is digits and dots, so quoting changes nothing for a
valid one; it keeps a malformed one from reshaping the URL). docs/reading-room.md lists templates.
"""

from __future__ import annotations

import string
from functools import lru_cache
from urllib.parse import quote, urlsplit

from service.errors import ServiceError

FIELD = "study_uid"


class ViewerUrlError(ServiceError, ValueError):
    """PTX_VIEWER_URL cannot make links; the message says why and shows the template (it holds no secret)."""

    code = "invalid_viewer_url"


@lru_cache(maxsize=8)
def check_template(template: str | None) -> str | None:
    """The template as configured (None: no viewer links), or ViewerUrlError naming PTX_VIEWER_URL and what is
    wrong: checked at start so a bad template stops start-up instead of failing every worklist page."""
    if template is None:
        return None
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise ViewerUrlError(f"PTX_VIEWER_URL {template!r} is not a valid template ({exc}); write the study's "
                             f"place as {{{FIELD}}}, e.g. https://pacs.example/ohif/viewer?StudyInstanceUIDs="
                             f"{{{FIELD}}}") from None
    names = {name for name, _, _ in fields}
    if FIELD not in names:
        raise ViewerUrlError(f"PTX_VIEWER_URL {template!r} has no {{{FIELD}}}: every study would get the same link")
    if names != {FIELD} or any(spec or conversion for _, spec, conversion in fields):
        raise ViewerUrlError(f"PTX_VIEWER_URL {template!r}: {{{FIELD}}} is the only field it may hold, plain "
                             f"(found {sorted(names)})")
    parts = urlsplit(template.format(study_uid="1.2"))
    if parts.scheme not in ("http", "https") and not (not parts.scheme and template.startswith("/")):
        raise ViewerUrlError(f"PTX_VIEWER_URL {template!r} must be an http:// or https:// URL, or a path on this "
                             "host starting with /")
    if parts.scheme and not parts.netloc:
        raise ViewerUrlError(f"PTX_VIEWER_URL {template!r} names no host")
    return template


def viewer_link(template: str | None, study_uid: str) -> str | None:
    """The study's viewer URL, or None when no viewer is configured."""
    if not template:
        return None
    return str(check_template(template)).format(study_uid=quote(study_uid, safe=""))
