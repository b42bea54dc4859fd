"""Delivery of result objects (SEG, SR, SC) to PACS destinations by C-STORE or DICOMweb STOW-RS (issue #5 §5).

    results written ─▶ Dispatcher.enqueue(study, object, kind, path)      one delivery per destination
                                 │                                           (store.add_delivery, idempotent)
    one thread per destination ─▶ run_once: store.due_deliveries(destination)
                                 ├─ sender.send(path)
                                 └─ store.delivery_attempt(ok | error + next_attempt_at)   (never deleted)

Why this shape:

* **Intake never waits for a PACS** (issue #7). `enqueue` only writes rows; the sending happens on the
  dispatcher's own threads (one per destination), never on the caller's thread or event loop, and every
  network step has a timeout, so an unreachable or hung PACS costs its thread a bounded time and nothing
  else.
* **Nothing is dropped.** A delivery leaves `pending` only as `delivered` or, once its attempts are spent,
  `failed`; both stay in the store (and its API) with the last error. Delivery is at least once: a crash
  between a send and its record sends the object again, which a PACS treats as the same SOP instance.
* **Backoff.** A failed attempt is retried after `base · factor^(n-1)` seconds (n = attempts so far), capped
  at `max`, minus up to `jitter` of it at random so deliveries that failed together do not retry in lock
  step; a server's `Retry-After` lengthens it (never beyond the cap).
* **A rejected object is retried rarely, not given up at once.** A rejection (C-STORE failure status, STOW
  409, no accepted presentation context, a refused association) will not succeed by itself, but it often
  succeeds once the PACS administrator changes its configuration. So a non-retryable error is recorded like
  any other failure, with the longest backoff: the delivery stays visible (pending, then failed once its
  attempts are spent) with the receiver's reason; an operator can send a failed one again
  (`POST /v1/deliveries/{id}/retry`).
* **One unreachable destination does not slow the others.** Each destination has its own thread and asks
  the store for its own due deliveries, so one waiting out a timeout (a black hole: connects, never
  answers) delays nobody else's next round. When a destination is found down (no connection, association
  refused or aborted, timeout, HTTP 5xx), its remaining deliveries of that round are recorded with the
  same error instead of each waiting out its own timeout. (They must be recorded, not skipped: the store
  hands out the earliest due deliveries first, and unrecorded ones would be handed out again.)
* Run **one dispatcher per database** (the store's `due_deliveries` is not a queue with leases).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import random
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import SplitResult, unquote, urlsplit

from service.store import DEFAULT_MAX_ATTEMPTS, DeliveryKind, DeliveryRecord, DeliveryState, ResultsStore, StoreError
from service.store.base import require_utc, utc_now

if TYPE_CHECKING:  # imported where used: pynetdicom and httpx load only in a process that delivers
    import httpx

__all__ = [
    "CStoreSender", "DeliveryError", "Destination", "Dispatcher", "Sender", "StowSender", "make_sender",
    "make_senders", "parse_destinations",
]

LOG = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "PTX_TRIAGE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAMED = re.compile(r"^([^=:/]+)=(.+)$")  # "name=URL": a URL's scheme holds no '=' before its "://"
_HTTP_SCHEMES = {"dicomweb+http": "http", "dicomweb+https": "https", "http": "http", "https": "https"}


# --- destinations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM C-STORE SCP (`dicom://AE@host:port`) or a DICOMweb service
    (`dicomweb+https://host/path`, or plain `https://` / `http://`) that takes STOW-RS at `{base_url}/studies`.

    `name` keys the deliveries in the store and labels logs and metrics, so it must stay the same across
    restarts (give one explicitly as `name=URL`; the default is the URL without credentials). Credentials
    from a DICOMweb URL's user-info are kept apart from the URL and out of the repr, the name and every
    message, so they are never logged.
    """

    name: str
    protocol: Literal["dicom", "dicomweb"]
    host: str
    port: int
    ae_title: str | None = None  # dicom: the called AE title
    base_url: str | None = None  # dicomweb: scheme://host[:port]/path, without credentials or trailing '/'
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        """The destination as a URL without credentials (for messages)."""
        if self.protocol == "dicom":
            return f"dicom://{self.ae_title}@{_host_for_url(self.host)}:{self.port}"
        assert self.base_url is not None
        return self.base_url

    @property
    def stow_url(self) -> str:
        if self.protocol != "dicomweb" or self.base_url is None:
            raise ValueError(f"destination {self.name!r} is not a DICOMweb destination")
        return f"{self.base_url}/studies"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """One destination from its setting: `[name=]dicom://AE@host:port` or `[name=]dicomweb+https://...`.
        Raises ValueError naming what is wrong (without echoing credentials)."""
        text = text.strip()
        if not text:
            raise ValueError("a destination must not be empty")
        name: str | None = None
        named = _NAMED.match(text)
        if named:
            name, text = named.group(1).strip(), named.group(2).strip()
            if not _NAME.match(name):
                raise ValueError(f"destination name {name!r} must be 1 to 64 letters, digits, '_', '.', '-' "
                                 "(it labels metrics and keys the deliveries)")
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme == "dicom":
            destination = _parse_dicom(text)
        elif scheme in _HTTP_SCHEMES:
            destination = _parse_dicomweb(text, _HTTP_SCHEMES[scheme])
        else:
            shown = scheme or "no scheme"
            raise ValueError(f"destination must start with dicom://, dicomweb+http(s):// or http(s)://, got {shown} "
                             "(e.g. dicom://PACS@10.0.0.5:104 or dicomweb+https://pacs.example/dicom-web)")
        if name is not None:
            object.__setattr__(destination, "name", name)
        return destination


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split(text: str, what: str) -> tuple[SplitResult, str, int | None]:
    """urlsplit with the errors a settings reader can act on; the credentials never enter a message."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:  # bad port or bracketed host; the message has no user-info in it
        reason = "port must be a number from 1 to 65535" if "port" in str(error).lower() else str(error)
        raise ValueError(f"{what} destination is not a valid URL: {reason}") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{what} destination names no host")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{what} destination port must be from 1 to 65535, got {port}")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} destination must not have a query or fragment ('?' or '#')")
    return parts, host, port


def _parse_dicom(text: str) -> Destination:
    parts, host, port = _split(text, "dicom://")
    netloc = parts.netloc
    if "@" not in netloc:
        raise ValueError("dicom:// destination needs the called AE title before '@', e.g. dicom://PACS@host:104")
    userinfo = netloc.rsplit("@", 1)[0]
    if ":" in userinfo:
        raise ValueError("dicom:// destination takes an AE title, not user:password, before '@'")
    ae_title = unquote(userinfo)
    if not 1 <= len(ae_title) <= 16 or not ae_title.isascii() or "\\" in ae_title \
            or not ae_title.strip() or any(ord(c) < 32 or ord(c) == 127 for c in ae_title):
        raise ValueError(f"AE title {ae_title!r} must be 1 to 16 printable ASCII characters without '\\'")
    if port is None:
        raise ValueError("dicom:// destination needs a port, e.g. dicom://PACS@host:104")
    if parts.path not in ("", "/"):
        raise ValueError("dicom:// destination takes no path")
    destination = Destination(name="", protocol="dicom", host=host, port=port, ae_title=ae_title.strip())
    object.__setattr__(destination, "name", destination.url)
    return destination


def _parse_dicomweb(text: str, scheme: str) -> Destination:
    parts, host, port = _split(text, "DICOMweb")
    username, password = parts.username, parts.password
    if password is not None and username is None:
        raise ValueError("DICOMweb destination has a password but no user name")
    path = parts.path.rstrip("/")
    base = f"{scheme}://{_host_for_url(host)}{f':{port}' if port is not None else ''}{path}"
    return Destination(name=base, protocol="dicomweb", host=host, port=port or (443 if scheme == "https" else 80),
                       base_url=base, username=unquote(username) if username is not None else None,
                       password=unquote(password) if password is not None else None)


def parse_destinations(value: str | Iterable[str] | None) -> list[Destination]:
    """The destinations of a setting: comma-separated (or a list, from TOML); empty or None: none.
    Names must be unique and no target may be listed twice (it would get every object twice)."""
    if value is None:
        return []
    items = [item for item in (value.split(",") if isinstance(value, str) else value) if item.strip()]
    destinations = [Destination.parse(item) for item in items]
    seen: dict[str, Destination] = {}
    for destination in destinations:
        if destination.name in seen:
            raise ValueError(f"destination name {destination.name!r} is used twice")
        for other in seen.values():
            if (other.protocol, other.host, other.port, other.ae_title, other.base_url) == \
                    (destination.protocol, destination.host, destination.port, destination.ae_title,
                     destination.base_url):
                raise ValueError(f"destinations {other.name!r} and {destination.name!r} name the same target")
        seen[destination.name] = destination
    return destinations


# --- senders -----------------------------------------------------------------------------------------------

class DeliveryError(Exception):
    """One send failed. `retryable`: may succeed later by itself (network, busy, out of resources) rather
    than being a rejection of the object or of us. `destination_down`: the failure concerns the destination,
    not this object (no connection, association refused, timeout, 5xx), so the round's other deliveries to
    it would fail the same way. `retry_after_s`: the receiver asked to wait at least this long."""

    def __init__(self, message: str, retryable: bool, *, destination_down: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.destination_down = destination_down
        self.retry_after_s = retry_after_s


class Sender(Protocol):
    """Sends one DICOM Part 10 file to one destination; raises DeliveryError, returns on success."""

    destination: Destination

    def send(self, path: str | Path) -> None: ...

    def close(self) -> None: ...


def _read_bytes(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DeliveryError(f"the object file is missing: {path}", retryable=False) from None
    except OSError as error:
        raise DeliveryError(f"cannot read the object file {path}: {error.strerror or error}", retryable=True) from None
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DeliveryError(f"{path} is not a DICOM Part 10 file (no 'DICM' after the preamble)", retryable=False)
    return data


# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): which failures may pass on a later attempt.
_CSTORE_RETRYABLE = {0x0110, 0x0210, 0x0213, 0xFE00}  # processing failure, duplicate invocation, resources, cancel
_DUPLICATE_SOP_INSTANCE = 0x0111  # the receiver already has this SOP instance (our earlier send got through)


def _status_retryable(status: int) -> bool:
    return status in _CSTORE_RETRYABLE or 0xA700 <= status <= 0xA7FF


def _status_name(status: int) -> str:
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return {0x0110: "processing failure", 0x0111: "duplicate SOP instance", 0x0117: "invalid SOP instance",
            0x0122: "SOP class not supported", 0x0124: "not authorised", 0x0210: "duplicate invocation",
            0x0211: "unrecognised operation", 0x0212: "mistyped argument", 0x0213: "resource limitation",
            0xFE00: "cancelled"}.get(status, "failure")


class CStoreSender:
    """C-STORE SCU for one `dicom://` destination: one association per object, proposing the object's SOP
    class in its own transfer syntax (and, for an uncompressed one, the other uncompressed syntaxes, which
    pynetdicom converts between losslessly). Every step is bounded: TCP connect by `connect_timeout_s`,
    the association, the C-STORE response and the network by `timeout_s`."""

    def __init__(self, destination: Destination, *, calling_ae: str = DEFAULT_CALLING_AE,
                 connect_timeout_s: float = 5.0, timeout_s: float = 30.0) -> None:
        if destination.protocol != "dicom":
            raise ValueError(f"CStoreSender needs a dicom:// destination, got {destination.name!r}")
        if not 1 <= len(calling_ae.strip()) <= 16 or "\\" in calling_ae or not calling_ae.isascii():
            raise ValueError(f"calling AE title {calling_ae!r} must be 1 to 16 ASCII characters without '\\'")
        self.destination = destination
        self.calling_ae = calling_ae.strip()
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s

    def send(self, path: str | Path) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt

        name = self.destination.name
        data = _read_bytes(path)  # the same missing / not-Part-10 errors as STOW
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise DeliveryError(f"cannot read {path} as DICOM: {error}", retryable=False) from None
        try:
            sop_class = UID(dataset.SOPClassUID)
            syntax = UID(dataset.file_meta.TransferSyntaxUID)
            dataset.SOPInstanceUID  # noqa: B018 - C-STORE needs it; fail here with a clear message
        except AttributeError as error:
            raise DeliveryError(f"{path} lacks what C-STORE needs: {error}", retryable=False) from None
        syntaxes = [syntax]
        if not syntax.is_compressed and syntax.is_little_endian:
            syntaxes += [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]

        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connect_timeout_s
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.add_requested_context(sop_class, syntaxes)
        connected = threading.Event()  # pynetdicom reports a refused connection as an abort; this tells them apart
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())])
        try:
            if not assoc.is_established:
                raise self._association_error(assoc, sop_class, syntax, connected.is_set())
            status = assoc.send_c_store(dataset)
            code = int(status.Status) if "Status" in status else None
        except ValueError as error:  # pynetdicom: no usable accepted context, or the dataset cannot be encoded
            raise DeliveryError(f"{name}: cannot send {sop_class.name}: {error}", retryable=False) from None
        finally:
            if assoc.is_established:  # otherwise pynetdicom has already closed it
                assoc.release()
        if code is None:
            raise DeliveryError(f"{name}: no C-STORE response within {self.timeout_s:g} s "
                                "(timeout, abort or invalid response)", retryable=True, destination_down=True)
        if code == 0x0000:
            return
        if code == _DUPLICATE_SOP_INSTANCE or 0xB000 <= code <= 0xBFFF:
            LOG.warning("delivery to %s: C-STORE succeeded with status 0x%04X (%s)", name, code,
                        "duplicate SOP instance, already stored" if code == _DUPLICATE_SOP_INSTANCE
                        else "warning: coercion or elements discarded")
            return
        comment = status.get("ErrorComment")
        raise DeliveryError(f"{name}: C-STORE failed with status 0x{code:04X} ({_status_name(code)})"
                            + (f": {comment}" if comment else ""), retryable=_status_retryable(code))

    def _association_error(self, assoc: object, sop_class: object, syntax: object, connected: bool) -> DeliveryError:
        name = self.destination.name
        rejected_contexts = getattr(assoc, "rejected_contexts", [])
        primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
        if getattr(assoc, "is_rejected", False) and primitive is not None:
            transient = getattr(primitive, "result", None) == 0x02
            return DeliveryError(f"{name}: association rejected ({primitive.result_str}, {primitive.source_str}: "
                                 f"{primitive.reason_str})", retryable=transient, destination_down=True)
        if rejected_contexts and not getattr(assoc, "accepted_contexts", None):
            return DeliveryError(f"{name}: the receiver accepted no presentation context for "
                                 f"{getattr(sop_class, 'name', sop_class)} in {getattr(syntax, 'name', syntax)}",
                                 retryable=False)
        if connected:
            return DeliveryError(f"{name}: association aborted or no answer within {self.timeout_s:g} s",
                                 retryable=True, destination_down=True)
        return DeliveryError(f"{name}: could not connect to {_host_for_url(self.destination.host)}:"
                             f"{self.destination.port} (refused, unreachable or no answer within "
                             f"{self.connect_timeout_s:g} s)", retryable=True, destination_down=True)

    def close(self) -> None:
        """Nothing held between sends (one association per object)."""


# STOW-RS (PS3.18 10.5): HTTP statuses by what they say about a retry and about the destination.
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
        except httpx.HTTPError as error:  # connection refused, reset, TLS, protocol errors
            raise DeliveryError(f"{name}: {type(error).__name__}: {error}", retryable=True,
                                destination_down=True) from None
        self._judge(response)

    def _judge(self, response: httpx.Response) -> None:
        name, code = self.destination.name, response.status_code
        what = f"{name}: STOW-RS answered {code} {response.reason_phrase}".rstrip()
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


def make_sender(destination: Destination, *, calling_ae: str = DEFAULT_CALLING_AE, connect_timeout_s: float = 5.0,
                timeout_s: float = 30.0, http_headers: Mapping[str, str] | None = None,
                verify: bool | str = True) -> Sender:
    """The sender for a destination's protocol."""
    if destination.protocol == "dicom":
        return CStoreSender(destination, calling_ae=calling_ae, connect_timeout_s=connect_timeout_s,
                            timeout_s=timeout_s)
    return StowSender(destination, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s, headers=http_headers,
                      verify=verify)


def make_senders(destinations: Iterable[Destination], **options: object) -> dict[str, Sender]:
    """One sender per destination, by name (what `Dispatcher` takes); options as for `make_sender`."""
    return {d.name: make_sender(d, **options) for d in destinations}  # type: ignore[arg-type]


# --- dispatcher --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backoff:
    """Delay before the next attempt after `attempts` failed ones: base · factor^(attempts-1), capped at
    `max_s`, minus a random share of up to `jitter` of it (so it lies in [(1 - jitter)·d, d])."""

    base_s: float = 30.0
    factor: float = 2.0
    max_s: float = 3600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(f"backoff needs 0 < base ({self.base_s}) <= max ({self.max_s})")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def ceiling_s(self, attempts: int) -> float:
        exponent = max(0, attempts - 1)
        try:
            delay = self.base_s * self.factor ** exponent
        except OverflowError:
            delay = self.max_s
        return min(self.max_s, delay)

    def delay_s(self, attempts: int, rng: random.Random, *, longest: bool = False) -> float:
        """The jittered delay after `attempts` failures; `longest`: the cap's (for a rejection)."""
        ceiling = self.max_s if longest else self.ceiling_s(attempts)
        return ceiling * (1.0 - self.jitter * rng.random())


class Dispatcher:
    """Sends due deliveries and records every attempt; `start()` runs it on its own thread.

    `senders` maps each configured destination's name to its sender. A delivery whose destination is no
    longer configured is recorded as a failed attempt saying so (with the longest backoff), so it stays
    visible and ends failed rather than lingering or being dropped.

    `on_attempt(destination, ok)` is called after each recorded attempt (a metrics counter); `counts()` is the
    store's count per state (a gauge). Use either `run_once` yourself or `start()`, not both at once.
    """

    def __init__(self, store: ResultsStore, senders: Mapping[str, Sender], *, backoff: Backoff | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, batch_size: int = 32, poll_interval_s: float = 5.0,
                 clock: Callable[[], datetime] = utc_now,
                 on_attempt: Callable[[str, bool], None] | None = None, rng: random.Random | None = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.store = store
        self.senders = dict(senders)
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.on_attempt = on_attempt
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._stopping = threading.Event()
        # One loop per configured destination, and one (None) for deliveries to destinations no longer
        # configured; each has its own wake-up.
        self._wakes: dict[str | None, threading.Event] = {name: threading.Event() for name in [*self.senders, None]}
        self._threads: list[threading.Thread] = []
        self._lifecycle = threading.Lock()

    # -- queueing ----------------------------------------------------------------------------------------

    def enqueue(self, study_uid: str, object_uid: str, kind: DeliveryKind | str, path: str | Path) -> dict[str, int]:
        """Queue one object for every configured destination, due now; returns {destination: delivery id}.
        Idempotent (the store keeps one delivery per object and destination). Only writes to the store, so
        it returns at database speed whatever the destinations' state; wakes the delivery thread."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no result object to deliver at {path}")
        kind = DeliveryKind(kind)
        ids = {name: self.store.add_delivery(study_uid, object_uid, kind, name, str(path),
                                             max_attempts=self.max_attempts)
               for name in self.senders}
        for name in ids:
            self._wakes[name].set()
        return ids

    async def enqueue_async(self, study_uid: str, object_uid: str, kind: DeliveryKind | str,
                            path: str | Path) -> dict[str, int]:
        """`enqueue` off the event loop (the store write is blocking I/O)."""
        return await asyncio.to_thread(self.enqueue, study_uid, object_uid, kind, path)

    def counts(self) -> dict[DeliveryState, int]:
        """Deliveries per state (every state present), for a gauge."""
        return self.store.delivery_counts()

    # -- one round ---------------------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None, destination: str | None = None,
                 exclude: Collection[str] = ()) -> int:
        """Send the deliveries due at `now` (default: the clock), at most `batch_size`, each destination on
        its own worker; record each attempt. Returns how many attempts were recorded. Takes at most about one
        sender timeout per destination when destinations are down (see the module's notes). `destination`:
        only its deliveries; `exclude`: none of those destinations' (the background loops use both)."""
        at = require_utc(now, "now") if now is not None else self.clock()
        due = self.store.due_deliveries(limit=self.batch_size, now=at, destination=destination, exclude=exclude)
        if not due:
            return 0
        groups: dict[str, list[DeliveryRecord]] = {}
        for record in due:
            groups.setdefault(record.destination, []).append(record)
        if len(groups) == 1:
            return self._run_destination(*next(iter(groups.items())), at)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups),
                                                   thread_name_prefix="ptx-delivery-send") as pool:
            futures = [pool.submit(self._run_destination, name, records, at) for name, records in groups.items()]
            return sum(future.result() for future in futures)

    def _run_destination(self, name: str, records: list[DeliveryRecord], now: datetime) -> int:
        sender = self.senders.get(name)
        down: DeliveryError | None = None
        recorded = 0
        for record in records:
            if self._stopping.is_set():
                break  # left due: sent after the next start
            if sender is None:
                error: DeliveryError | None = DeliveryError(
                    f"destination {name!r} is not configured (any more); configure it again to deliver",
                    retryable=False)
            elif down is not None:
                error = DeliveryError(f"not sent: {down.message} (on an earlier delivery this round)",
                                      down.retryable, destination_down=True, retry_after_s=down.retry_after_s)
            else:
                error = self._send(sender, record)
                if error is not None and error.destination_down:
                    down = error
            recorded += self._record(record, error, now)
        return recorded

    def _send(self, sender: Sender, record: DeliveryRecord) -> DeliveryError | None:
        started = time.monotonic()
        try:
            sender.send(record.path)
        except DeliveryError as error:
            return error
        except Exception as error:  # a sender bug must not kill the round; keep it visible and retried
            LOG.exception("delivery %d to %s: the sender raised", record.id, record.destination)
            return DeliveryError(f"internal error in the sender: {type(error).__name__}: {error}", retryable=True)
        LOG.info("delivery %d (%s) to %s: delivered in %.2f s", record.id, record.kind.value, record.destination,
                 time.monotonic() - started)
        return None

    def _record(self, record: DeliveryRecord, error: DeliveryError | None, now: datetime) -> int:
        next_at = None
        if error is not None:
            attempts = record.attempts + 1
            with self._rng_lock:
                delay = self.backoff.delay_s(attempts, self._rng, longest=not error.retryable)
            if error.retry_after_s is not None:
                delay = min(self.backoff.max_s, max(delay, error.retry_after_s))
            next_at = now + timedelta(seconds=delay)
        try:
            updated = self.store.delivery_attempt(record.id, error is None,
                                                  error=None if error is None else error.message[:2000],
                                                  next_attempt_at=next_at)
        except StoreError as store_error:  # e.g. another dispatcher recorded it first; the row says what happened
            LOG.error("delivery %d to %s: could not record the attempt: %s", record.id, record.destination,
                      store_error)
            return 0
        if error is not None:
            if updated.state is DeliveryState.FAILED:
                LOG.error("delivery %d (%s) to %s failed for good after %d attempts: %s", record.id,
                          record.kind.value, record.destination, updated.attempts, error.message)
            else:
                LOG.warning("delivery %d (%s) to %s: attempt %d of %d failed (%s), next at %s: %s", record.id,
                            record.kind.value, record.destination, updated.attempts, updated.max_attempts,
                            "retryable" if error.retryable else "rejected", next_at and next_at.isoformat(),
                            error.message)
        if self.on_attempt is not None:
            try:
                self.on_attempt(record.destination, error is None)
            except Exception:
                LOG.exception("delivery metrics hook failed")
        return 1

    # -- background ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run rounds on daemon threads until `stop()`, one per destination (so that a destination waiting
        out a timeout never delays another's next round) and one for deliveries to destinations no longer
        configured: at once, then whenever `enqueue` wakes it, a full batch was sent (more may be due) or
        `poll_interval_s` passed. Returns immediately."""
        with self._lifecycle:
            if any(thread.is_alive() for thread in self._threads):
                return
            self._stopping.clear()
            self._threads = [threading.Thread(target=self._loop, args=(name,), daemon=True,
                                              name=f"ptx-delivery-{name or 'unconfigured'}")
                             for name in self._wakes]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ask the threads to stop after their current sends and wait up to `timeout_s`; True when they ended.
        Unsent deliveries stay pending in the store and go out after the next start."""
        with self._lifecycle:
            self._stopping.set()
            for wake in self._wakes.values():
                wake.set()
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            LOG.warning("delivery threads still sending after %.1f s (%s); they end when their sends time out",
                        timeout_s, ", ".join(alive))
            return False
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and close the senders (their HTTP connection pools)."""
        self.stop(timeout_s)
        for sender in self.senders.values():
            try:
                sender.close()
            except Exception:
                LOG.exception("closing the sender for %s failed", sender.destination.name)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _loop(self, name: str | None) -> None:
        """Rounds for one destination (`name`), or for every destination not configured (None)."""
        wake = self._wakes[name]
        configured = tuple(self.senders)
        while not self._stopping.is_set():
            wake.clear()
            try:
                sent = self.run_once(destination=name) if name is not None else self.run_once(exclude=configured)
                busy = sent >= self.batch_size
            except Exception:  # the store unreachable, say: keep the thread, try again after the interval
                LOG.exception("delivery round for %s failed", name or "unconfigured destinations")
                busy = False
            if not busy:
                wake.wait(self.poll_interval_s)
