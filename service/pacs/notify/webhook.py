"""The webhook channel: a JSON POST signed with HMAC-SHA256 over a timestamp and the body (issue 14 §5).

    X-PTX-Timestamp:       Unix seconds when this attempt was signed
    X-PTX-Signature:       sha256=<hex HMAC-SHA256(PTX_NOTIFY_WEBHOOK_SECRET, "<timestamp>." + body)>
    X-PTX-Notification-Id: the outbox id, the same on every attempt (a receiver drops repeats by it)

Why the timestamp is signed: a captured request replayed later carries its old timestamp, which a receiver
refuses outside its window (`verify`, REPLAY_WINDOW_S by default); the signature covers it, so it cannot be
changed. Each attempt is signed afresh, so a retry after a long outage is not refused as a replay.

The body carries no patient identifier (they leave only in the HL7 message): the study's UID, the film's
Accession Number, the finding in our words and our versions. Answers: 2xx is delivered; 408, 425, 429 and
5xx are retried (Retry-After honoured up to the backoff's cap); a redirect is not followed; other 4xx are a
rejection (kept, retried rarely). Only the status and its standard phrase are kept, never the response.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from service.pacs.delivery.sender import DeliveryError
from service.pacs.delivery.stow import (
    _keep_reason_phrases_out_of_httpx_logs,
    _phrase,
    _retry_after_s,
)
from service.pacs.notify.content import FilmIdentifiers, NotificationContent
from service.store import NotificationRecord

TIMESTAMP_HEADER, SIGNATURE_HEADER, ID_HEADER = "X-PTX-Timestamp", "X-PTX-Signature", "X-PTX-Notification-Id"
REPLAY_WINDOW_S = 300.0
EVENT = "ptx.finding"
_RETRYABLE = frozenset({408, 425, 429})
_CONFIGURATION = frozenset({401, 403, 404, 405, 407, 410})  # every notification would meet it: the receiver's setup


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-PTX-Signature value for `body` signed at `timestamp`."""
    return "sha256=" + hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


class SignatureError(ValueError):
    """A webhook request that must be refused; the message says which check failed."""


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
           window_s: float = REPLAY_WINDOW_S) -> int:
    """A receiver's check (also what the tests' receiver runs): the signature over the timestamp and the body
    in constant time, and the timestamp within `window_s` of `now`. Returns the timestamp; SignatureError
    otherwise. `headers` is looked up case-insensitively."""
    lowered = {key.lower(): value for key, value in headers.items()}
    stamp, given = lowered.get(TIMESTAMP_HEADER.lower()), lowered.get(SIGNATURE_HEADER.lower())
    if not stamp or not given:
        raise SignatureError(f"missing {TIMESTAMP_HEADER if not stamp else SIGNATURE_HEADER} header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} must be whole Unix seconds") from None
    if not hmac.compare_digest(sign(secret, timestamp, body), given):
        raise SignatureError(f"{SIGNATURE_HEADER} does not match the body and timestamp")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > window_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is {age:.0f} s from now, outside the {window_s:.0f} s replay window")
    return timestamp


def webhook_body(record: NotificationRecord, content: NotificationContent, accession_number: str | None) -> bytes:
    """The JSON posted for one notification (compact, keys sorted: the signed bytes are these)."""
    body = {
        "event": EVENT,
        "notification_id": record.id,
        "study_instance_uid": content.study_uid,
        "accession_number": accession_number,
        "priority": content.priority.value,
        "result_status": "preliminary",
        "score": content.score,
        "positive": content.positive,
        "largest_area_mm2": content.largest_area_mm2,
        "finding": content.text,
        "recorded_at": content.recorded_at,
        "software": content.software,
        "models": content.models,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def check_webhook_url(url: str) -> str:
    """PTX_NOTIFY_WEBHOOK: an http(s) URL with a host; ValueError naming the setting."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        raise ValueError("PTX_NOTIFY_WEBHOOK is not a valid URL (the port must be 1 to 65535)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"PTX_NOTIFY_WEBHOOK must be an http:// or https:// URL with a host, got "
                         f"{parts.scheme or 'no scheme'}://...")
    if parts.username or parts.password:
        raise ValueError("PTX_NOTIFY_WEBHOOK must not carry credentials: the body is signed with "
                         "PTX_NOTIFY_WEBHOOK_SECRET")
    return url.strip()


class WebhookSender:
    """POSTs a notification's JSON, signed at each attempt; `send` raises DeliveryError."""

    def __init__(self, url: str, secret: bytes, *,
                 identifiers: Callable[[NotificationContent], FilmIdentifiers] = lambda _: FilmIdentifiers(),
                 connect_timeout_s: float = 5.0, timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        import httpx

        if not secret:
            raise ValueError("PTX_NOTIFY_WEBHOOK_SECRET must not be empty")
        self.url, self._secret, self.clock = check_webhook_url(url), secret, clock
        self.identifiers = identifiers
        _keep_reason_phrases_out_of_httpx_logs()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                                    follow_redirects=False)

    def send(self, record: NotificationRecord) -> None:
        import httpx

        content = NotificationContent.from_json(record.payload)
        body = webhook_body(record, content, self.identifiers(content).accession_number)  # never the patient's
        timestamp = int(self.clock())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp),
                   SIGNATURE_HEADER: sign(self._secret, timestamp, body), ID_HEADER: str(record.id)}
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as error:
            raise DeliveryError(f"webhook: no answer within the timeout ({type(error).__name__})", retryable=True,
                                destination_down=True) from None
        except httpx.HTTPError as error:  # refused, reset, TLS, protocol errors (which may quote the peer)
            raise DeliveryError(f"webhook: {type(error).__name__} (no answer)", retryable=True,
                                destination_down=True) from None
        code = response.status_code
        if 200 <= code < 300:
            return
        what = f"webhook: answered {code} {_phrase(code)}".rstrip()
        if code in _RETRYABLE or code >= 500:
            raise DeliveryError(what, retryable=True, destination_down=code != 408,
                                retry_after_s=_retry_after_s(response.headers.get("Retry-After")))
        if 300 <= code < 400:
            raise DeliveryError(f"{what}: a redirect (configure the final URL)", retryable=False,
                                destination_down=True)
        raise DeliveryError(what, retryable=False, destination_down=code in _CONFIGURATION)

    def close(self) -> None:
        self._client.close()
