"""Sending by DICOMweb STOW-RS (httpx): HTTP statuses and the failed-SOP reasons of the answer judged.

A failure is stored and logged as the HTTP status with its standard phrase (RFC 9110, not the server's
reason phrase), the failure reason codes and our own words: never the response body, the server's reason
phrase or a protocol error's quote of what the server sent, which are the peer's free text and may carry
the object's values (issue 13 §11a). httpx's own INFO line for each request ends with the server's reason
phrase; a filter on its logger puts the standard phrase there instead (httpcore's DEBUG traces, off in
service, show the raw response).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from service.pacs.delivery.cstore import (
    _DUPLICATE_SOP_INSTANCE,
    _status_name,
    _status_retryable,
)
from service.pacs.delivery.destinations import Destination
from service.pacs.delivery.sender import DeliveryError, _read_bytes
from service.store.base import utc_now

if TYPE_CHECKING:  # imported where used: pynetdicom and httpx load only in a process that delivers
    import httpx

LOG = logging.getLogger("service.pacs.delivery")


_HTTP_RETRYABLE = {408, 425, 429}
_HTTP_DESTINATION_LEVEL = {401, 403, 404, 405, 406, 407, 415}  # configuration: every object would meet it
_FAILED_SOP_SEQUENCE = "00081198"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_REFERENCED_SOP_SEQUENCE = "00081199"


class StowSender:
    """STOW-RS client for one DICOMweb destination: POSTs the Part 10 file, unchanged, as the one part of a
    `multipart/related; type="application/dicom"` body to `{base}/studies`, asking for a JSON response.

    Success is 200 or 202 without a Failed SOP Sequence (a 202 with only warnings, or a failure "duplicate
    SOP instance", counts as stored). User-info credentials become HTTP Basic auth (the URL httpx sees and
    logs has none); `headers` adds others, e.g. `{"Authorization": "Bearer ..."}`. Redirects are not followed
    (a STOW base URL should be the final one, and a redirect would replay the credentials elsewhere)."""

    def __init__(self, destination: Destination, *, connect_timeout_s: float = 5.0, timeout_s: float = 30.0,
                 headers: Mapping[str, str] | None = None, verify: bool | str = True) -> None:
        import httpx

        if destination.protocol != "dicomweb":
            raise ValueError(f"StowSender needs a DICOMweb destination, got {destination.name!r}")
        self.destination = destination
        self.timeout_s = timeout_s
        auth = None
        if destination.username is not None:
            auth = httpx.BasicAuth(destination.username, destination.password or "")
            if destination.base_url and destination.base_url.startswith("http://"):
                LOG.warning("delivery to %s: credentials over plain http are readable on the network",
                            destination.name)
        _keep_reason_phrases_out_of_httpx_logs()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), auth=auth,
                                    headers=dict(headers or {}), follow_redirects=False, verify=verify)

    def send(self, path: str | Path) -> None:
        import httpx

        name = self.destination.name
        data = _read_bytes(path)
        boundary = uuid.uuid4().hex
        while f"--{boundary}".encode() in data:  # practically never, but a boundary must not occur in a part
            boundary = uuid.uuid4().hex
        body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data,
                         f"\r\n--{boundary}--\r\n".encode()))
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            response = self._client.post(self.destination.stow_url, content=body, headers=headers)
        except httpx.TimeoutException as error:
            raise DeliveryError(f"{name}: no answer within the timeout ({type(error).__name__})", retryable=True,
                                destination_down=True) from None
        except httpx.HTTPError as error:  # connection refused, reset, TLS, protocol errors (which quote the peer)
            raise DeliveryError(f"{name}: {type(error).__name__} (no STOW-RS answer)", retryable=True,
                                destination_down=True) from None
        self._judge(response)

    def _judge(self, response: httpx.Response) -> None:
        name, code = self.destination.name, response.status_code
        what = f"{name}: STOW-RS answered {code} {_phrase(code)}".rstrip()
        failures, warnings = _stow_reasons(response)
        if code in (200, 202):
            if not failures or all(reason == _DUPLICATE_SOP_INSTANCE for reason in failures):
                if warnings or failures:
                    LOG.warning("delivery to %s: stored with warning reasons %s", name,
                                ", ".join(f"0x{r:04X}" for r in warnings + failures))
                return
            raise DeliveryError(f"{what} with failure reasons {_reasons(failures)}",
                                retryable=all(_status_retryable(r) for r in failures))
        if code == 409 or (failures and 400 <= code < 500):
            if failures and all(reason == _DUPLICATE_SOP_INSTANCE for reason in failures):
                LOG.warning("delivery to %s: the receiver already has this SOP instance (409, 0x0111)", name)
                return
            detail = f" with failure reasons {_reasons(failures)}" if failures else ""
            raise DeliveryError(what + detail, retryable=bool(failures) and all(_status_retryable(r) for r in failures))
        retry_after = _retry_after_s(response.headers.get("Retry-After"))
        if code in _HTTP_RETRYABLE or code >= 500:
            raise DeliveryError(what, retryable=True, destination_down=code != 408, retry_after_s=retry_after)
        if 300 <= code < 400:
            raise DeliveryError(f"{what}: a redirect (configure the final STOW-RS base URL)", retryable=False,
                                destination_down=True)
        if code in _HTTP_DESTINATION_LEVEL:
            raise DeliveryError(what, retryable=False, destination_down=True)
        if 400 <= code < 500:
            raise DeliveryError(what, retryable=False)
        raise DeliveryError(f"{what}: not a STOW-RS answer", retryable=True)

    def close(self) -> None:
        self._client.close()


class _StandardPhrase(logging.Filter):
    """Rewrites httpx's 'HTTP Request: METHOD URL "VERSION CODE PHRASE"' record with the standard phrase."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if str(record.msg).startswith("HTTP Request:") and isinstance(args, tuple) and len(args) == 5 \
                and isinstance(args[3], int):
            record.args = (*args[:4], _phrase(args[3]))
        return True


def _keep_reason_phrases_out_of_httpx_logs() -> None:
    """Attach `_StandardPhrase` to the httpx logger, once per process."""
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _StandardPhrase) for f in httpx_log.filters):
        httpx_log.addFilter(_StandardPhrase())


def _phrase(code: int) -> str:
    """The standard phrase of an HTTP status (empty for a code without one), never the server's own."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _reasons(codes: list[int]) -> str:
    return ", ".join(f"0x{code:04X} ({_status_name(code)})" for code in codes)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - utc_now()).total_seconds())


def _stow_reasons(response: httpx.Response) -> tuple[list[int], list[int]]:
    """(Failure Reasons of the Failed SOP Sequence, Warning Reasons of the Referenced SOP Sequence) of a
    STOW-RS response in DICOM JSON or XML; a Failed SOP item without a reason counts as 0x0110."""
    content_type = response.headers.get("content-type", "").lower()
    body = response.content
    if not body.strip():
        return [], []
    try:
        if "xml" in content_type or body.lstrip().startswith(b"<"):
            return _xml_reasons(ElementTree.fromstring(body))
        return _json_reasons(json.loads(body))
    except (ValueError, ElementTree.ParseError, TypeError, AttributeError):
        LOG.debug("STOW-RS response body is neither DICOM JSON nor XML")
        return [], []


def _json_items(dataset: dict, tag: str) -> list[dict]:
    element = dataset.get(tag) or {}
    return [item for item in element.get("Value", []) if isinstance(item, dict)]


def _json_reasons(document: object) -> tuple[list[int], list[int]]:
    datasets = document if isinstance(document, list) else [document]
    failures: list[int] = []
    warnings: list[int] = []
    for dataset in datasets:
        if not isinstance(dataset, dict):
            continue
        for item in _json_items(dataset, _FAILED_SOP_SEQUENCE):
            values = (item.get(_FAILURE_REASON) or {}).get("Value") or [0x0110]
            failures.append(int(values[0]))
        for item in _json_items(dataset, _REFERENCED_SOP_SEQUENCE):
            values = (item.get(_WARNING_REASON) or {}).get("Value") or []
            warnings.extend(int(value) for value in values[:1])
    return failures, warnings


def _xml_reasons(root: ElementTree.Element) -> tuple[list[int], list[int]]:
    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    def reasons(sequence_tag: str, reason_tag: str, default: int | None) -> list[int]:
        found: list[int] = []
        for attribute in root.iter():
            if local(attribute.tag) != "DicomAttribute" or attribute.get("tag", "").upper() != sequence_tag:
                continue
            for item in (child for child in attribute if local(child.tag) == "Item"):
                values = [value.text for reason in item if local(reason.tag) == "DicomAttribute"
                          and reason.get("tag", "").upper() == reason_tag
                          for value in reason if local(value.tag) == "Value" and value.text]
                if values:
                    found.append(int(values[0]))
                elif default is not None:
                    found.append(default)
        return found

    return reasons(_FAILED_SOP_SEQUENCE, _FAILURE_REASON, 0x0110), reasons(_REFERENCED_SOP_SEQUENCE,
                                                                          _WARNING_REASON, None)
