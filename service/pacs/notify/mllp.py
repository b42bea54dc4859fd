"""The HL7 channel: one ORU^R01 per connection to the RIS over MLLP, and its acknowledgement judged.

MLLP (HL7 v2 Minimal Lower Layer Protocol): <VT> message <FS><CR> each way. One connection per message:
notifications are rare (a STAT or URGENT finding), and a fresh connection has no half-closed state to
discover after a RIS restart. Every step has a timeout (connect, send, the answer), so a RIS that accepts and
never answers costs the channel's thread a bounded time, and intake nothing.

Errors are `DeliveryError`s in our words, for the dispatcher's backoff: no connection, a timeout, a closed
connection or an unreadable answer are retryable and mean the RIS is down for the round; AR / CR retryable;
AE / CE a rejection (kept, retried rarely). Neither the message nor the RIS's text enters an error or a log.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from service.pacs.delivery.sender import DeliveryError
from service.pacs.notify.content import FilmIdentifiers, NotificationContent
from service.pacs.notify.hl7 import (
    ACCEPTED,
    ERROR,
    REJECTED,
    UnreadableAcknowledgement,
    oru_r01,
    read_acknowledgement,
)
from service.store import NotificationRecord, utc_now

START, END = b"\x0b", b"\x1c\x0d"  # <VT> ... <FS><CR>
MAX_ANSWER_BYTES = 1 << 20  # an ACK is a few hundred bytes; a peer streaming more is not answering us


@dataclass(frozen=True)
class MllpAddress:
    """`mllp://host:port`, the RIS's HL7 listener (PTX_NOTIFY_HL7)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> MllpAddress:
        """ValueError naming PTX_NOTIFY_HL7 and what is wrong."""
        example = "e.g. mllp://ris.example:2575"
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError:
            raise ValueError(f"PTX_NOTIFY_HL7 is not a valid mllp:// address (the port must be 1 to 65535), "
                             f"{example}") from None
        if parts.scheme.lower() != "mllp":
            raise ValueError(f"PTX_NOTIFY_HL7 must start with mllp://, got {parts.scheme or 'no scheme'} ({example})")
        if not parts.hostname or port is None:
            raise ValueError(f"PTX_NOTIFY_HL7 needs a host and a port, {example}")
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"PTX_NOTIFY_HL7 takes only mllp://host:port ({example})")
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mllp://{host}:{self.port}"


class MllpSender:
    """Sends a notification's ORU^R01 to the RIS and judges its ACK; `send` raises DeliveryError."""

    def __init__(self, address: MllpAddress, *, sending_facility: str,
                 identifiers: Callable[[NotificationContent], FilmIdentifiers] = lambda _: FilmIdentifiers(),
                 connect_timeout_s: float = 5.0, timeout_s: float = 30.0,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.address, self.identifiers = address, identifiers
        self.sending_facility = sending_facility
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self.clock = clock

    def send(self, record: NotificationRecord) -> None:
        content = NotificationContent.from_json(record.payload)
        message = oru_r01(content, self.identifiers(content), sending_facility=self.sending_facility,
                          now=self.clock())
        answer = self.exchange(message.encode("utf-8"))
        try:
            ack = read_acknowledgement(answer.decode("utf-8", errors="replace"))
        except UnreadableAcknowledgement as error:
            raise DeliveryError(f"hl7: {error}", retryable=True, destination_down=True) from None
        if ack.control_id != content.control_id:
            raise DeliveryError(f"hl7: the RIS acknowledged another message ({ack.code} for another control ID)",
                                retryable=True, destination_down=True)
        if ack.code in ACCEPTED:
            return
        if ack.code in REJECTED:
            raise DeliveryError(f"hl7: the RIS rejected the message ({ack.code}: application reject, "
                                "e.g. busy or down); sent again later", retryable=True, destination_down=True)
        if ack.code in ERROR:
            raise DeliveryError(f"hl7: the RIS answered {ack.code} (application error in the message); "
                                "kept and retried rarely", retryable=False)
        raise DeliveryError(f"hl7: the RIS answered an unknown acknowledgement code ({ack.code[:2]!r})",
                            retryable=True, destination_down=True)

    def exchange(self, message: bytes) -> bytes:
        """Send one framed message and return the framed answer's content (between <VT> and <FS><CR>)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with socket.create_connection((self.address.host, self.address.port),
                                          timeout=self.connect_timeout_s) as connection:
                connection.settimeout(self.timeout_s)
                connection.sendall(START + message + END)
                return _read_frame(connection, deadline)
        except TimeoutError:
            raise DeliveryError("hl7: no answer from the RIS within the timeout", retryable=True,
                                destination_down=True) from None
        except OSError as error:
            raise DeliveryError(f"hl7: no connection to the RIS ({type(error).__name__})", retryable=True,
                                destination_down=True) from None

    def close(self) -> None:
        """Nothing held between messages (one connection each)."""


def _read_frame(connection: socket.socket, deadline: float) -> bytes:
    buffer = bytearray()
    while END not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        chunk = connection.recv(65536)
        if not chunk:
            raise DeliveryError("hl7: the RIS closed the connection without an acknowledgement", retryable=True,
                                destination_down=True)
        buffer += chunk
        if len(buffer) > MAX_ANSWER_BYTES:
            raise DeliveryError(f"hl7: the RIS's answer exceeds {MAX_ANSWER_BYTES} bytes without an end of frame",
                                retryable=True, destination_down=True)
    start = buffer.find(START)
    if start < 0 or start > buffer.find(END):
        raise DeliveryError("hl7: the RIS's answer is not MLLP-framed (no <VT> before <FS><CR>)", retryable=True,
                            destination_down=True)
    return bytes(buffer[start + 1:buffer.find(END)])
