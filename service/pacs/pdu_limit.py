"""The DICOM listener's PDU limits, size and time, enforced on what the peer sends, not only negotiated.

pynetdicom announces our Maximum Length Received (PTX_DICOM_MAX_PDU) in the A-ASSOCIATE-AC and well-behaved
senders cut their P-DATA-TF PDUs to it, but it reads whatever length a PDU header declares: a peer declaring
a 4 GB PDU is read into memory for as long as it keeps sending (and one that stops waits out the network
timeout), and it assembles a whole C-STORE dataset (in a file, as the listener has it receive them),
however many PDUs it comes in. This module watches the byte stream under pynetdicom instead: every PDU
header is checked as it arrives, and every PDV item inside P-DATA, so that a PDU over PTX_DICOM_MAX_PDU or
a dataset over PTX_MAX_FILE_BYTES (the HTTP upload limit) is refused before it is read, with an A-ABORT
(service-provider, invalid PDU parameter value, PS3.8 9.3.8) and the connection closed. Memory per
association is then bounded by the PDU limit, and the disk a C-STORE can fill by the message limit.

The same wrapper enforces the read deadlines of `service.pacs.connection_guard.PeerDeadlines` (the
A-ASSOCIATE-RQ within PTX_DICOM_ACSE_TIMEOUT_S, each PDU without stalling): a read that would block past
one closes the connection (`recv` returns b"") instead of holding an association slot forever.

Why at the socket rather than in pynetdicom: its PDU reader is private and reads the header and body in one
method; the server's request handler class is a documented hook (`AssociationServer(request_handler=...)`,
passed through `AE.make_server`) and the raw socket is all it needs to wrap.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler

from service.pacs.connection_guard import PeerDeadlines, PeerTimeouts, enable_keepalive

log = logging.getLogger("ptx.dicom")

P_DATA_TF = 0x04
# A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and A-ABORT PDUs are not covered by Maximum Length Received; an
# A-ASSOCIATE-RQ proposing 128 presentation contexts with a dozen transfer syntaxes each is ~50 KB.
CONTROL_PDU_LIMIT = 1024 * 1024
HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of what follows the 6-byte header
ABORT_INVALID_PARAMETER = 6  # A-ABORT reason: invalid-PDU-parameter value
ABORT_SOURCE_PROVIDER = 2  # A-ABORT source: DICOM UL service-provider (initiated the abort)


def pdu_limit(pdu_type: int, max_pdu: int) -> int | None:
    """The largest PDU length (the header's length field) we read for `pdu_type`; None: no limit.

    P-DATA-TF: our Maximum Length Received (PS3.8 D.1: the length of the PDU's variable field), none when it
    is 0 (unlimited, as in pynetdicom). Every other PDU: `CONTROL_PDU_LIMIT`."""
    if pdu_type == P_DATA_TF:
        return max_pdu or None
    return CONTROL_PDU_LIMIT


class Frames:
    """A stream of frames, each a fixed-size header then a body of the length the header gives, followed
    across chunks of any size (PDUs in the byte stream; PDV items in a P-DATA body).

    `on_start()` runs when a frame's first byte arrives; `on_header(fields)` gets each unpacked header and
    returns its body's length, or None to stop the stream; `on_body(piece)` sees the body in pieces (False
    stops it); `on_end()` runs after each complete body.
    """

    def __init__(self, header: struct.Struct, on_header: Callable[[tuple[int, ...]], int | None],
                 on_body: Callable[[memoryview], bool] | None = None,
                 on_end: Callable[[], None] | None = None, on_start: Callable[[], None] | None = None) -> None:
        self.header, self.on_header, self.on_body, self.on_end = header, on_header, on_body, on_end
        self.on_start = on_start
        self._pending = bytearray()  # a header's bytes so far
        self._body_left = 0

    def feed(self, data: memoryview) -> bool:
        """Advance through `data`; False once a callback stopped the stream."""
        position = 0
        while position < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - position)
                if self.on_body is not None and not self.on_body(data[position:position + step]):
                    return False
                self._body_left -= step
                position += step
                if not self._body_left and self.on_end is not None:
                    self.on_end()
                continue
            if not self._pending and self.on_start is not None:
                self.on_start()
            take = min(self.header.size - len(self._pending), len(data) - position)
            self._pending += data[position:position + take]
            position += take
            if len(self._pending) < self.header.size:
                continue
            length = self.on_header(self.header.unpack(self._pending))
            self._pending.clear()
            if length is None:
                return False
            self._body_left = length
            if not length and self.on_end is not None:
                self.on_end()
        return True


class DatasetMeter:
    """Follows the PDV items inside P-DATA-TF bodies (PS3.8 9.3.5: 4-byte length, presentation context ID,
    message control header, fragment) and keeps the size of the message being received, so that one
    message (a C-STORE dataset) over `limit` bytes is refused before its fragment is read. pynetdicom
    assembles a whole dataset (in a temporary file) before our C-STORE handler sees it: without this a peer
    keeping every PDU under the PDU limit could still send a dataset of any size."""

    ITEM = struct.Struct(">LBB")  # item length (from the context ID on), context ID, message control header
    LAST_FRAGMENT = 0x02

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last = False
        self.message_bytes = 0  # received so far of the message in progress
        self._items = Frames(self.ITEM, self._item, on_end=self._item_end)

    def feed(self, body: bytes | memoryview) -> bool:
        """Advance through P-DATA body bytes; False when a fragment would take the message over `limit`."""
        return self._items.feed(memoryview(body))

    def _item(self, fields: tuple[int, ...]) -> int | None:
        length, _, control = fields
        fragment = max(length - 2, 0)
        self.message_bytes += fragment
        if self.message_bytes > self.limit:
            return None
        self._last = bool(control & self.LAST_FRAGMENT)
        return fragment

    def _item_end(self) -> None:
        if self._last:  # the message's last fragment: the next one starts from nothing
            self.message_bytes = 0


class PduLimitedSocket:
    """A connected socket that checks each PDU header in the bytes it hands up, and refuses one over its limit.

    It follows PDU boundaries in the stream (6-byte header, then `length` bytes), whatever sizes the reader
    asks for, and the PDV items inside P-DATA (`DatasetMeter`). A PDU over its limit, or a message over
    `max_message` bytes: an A-ABORT PDU goes to the peer, the connection is shut down and `recv` returns b""
    (to pynetdicom, the transport connection closed), so the rest is never read. With `deadlines`, a read
    that would wait past one shuts the connection down the same way (`timed_out` says why), and writes
    wait at most the network timeout for a peer that stopped reading. Everything else is the wrapped
    socket's (select() works through `fileno`).
    """

    def __init__(self, sock: socket.socket, max_pdu: int, peer: str, max_message: int | None = None,
                 deadlines: PeerDeadlines | None = None) -> None:
        self._sock, self._max_pdu, self._peer = sock, max_pdu, peer
        self._in_p_data = False
        self._meter = DatasetMeter(max_message) if max_message else None
        self._pdus = Frames(HEADER, self._pdu, self._pdu_body if self._meter is not None else None,
                            on_end=self._pdu_end, on_start=None if deadlines is None else deadlines.pdu_started)
        self._deadlines = deadlines
        if deadlines is not None:
            sock.settimeout(deadlines.timeouts.network_s)
        self.refused: tuple[int, int] | None = None  # (PDU type, declared length) once a PDU was refused
        self.timed_out: str | None = None  # which deadline the peer missed, once it did

    def recv(self, bufsize: int, *flags: int) -> bytes:
        if self.refused is not None or self.timed_out is not None:
            return b""
        data = self._read(bufsize, *flags)
        if data and not self._pdus.feed(memoryview(data)):
            return b""
        return data

    def _read(self, bufsize: int, *flags: int) -> bytes:
        """The wrapped socket's recv, bounded by the next deadline (b"" once it has passed)."""
        if self._deadlines is None:
            return self._sock.recv(bufsize, *flags)
        wait = self._deadlines.wait_s()
        if wait > 0:
            self._sock.settimeout(wait)
            try:
                return self._sock.recv(bufsize, *flags)
            except TimeoutError:
                pass
            finally:
                self._sock.settimeout(self._deadlines.timeouts.network_s)  # what a send may wait
        self._time_out(self._deadlines.overdue())
        return b""

    def _time_out(self, why: str) -> None:
        self.timed_out = why
        log.warning("DICOM peer %s closed: %s", self._peer, why)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the peer may be gone already
            pass

    def _pdu(self, fields: tuple[int, ...]) -> int | None:
        """A PDU header: its length, or None (and refused) when over its limit."""
        pdu_type, _, length = fields
        limit = pdu_limit(pdu_type, self._max_pdu)
        if limit is not None and length > limit:
            self._refuse(pdu_type, length, limit, "PDU", "PTX_DICOM_MAX_PDU" if pdu_type == P_DATA_TF else None)
            return None
        self._in_p_data = pdu_type == P_DATA_TF
        if self._deadlines is not None:
            self._deadlines.pdu_length(length)
        return length

    def _pdu_end(self) -> None:
        if self._deadlines is not None:
            self._deadlines.pdu_ended()

    def _pdu_body(self, piece: memoryview) -> bool:
        """Part of a PDU body: P-DATA goes through the message meter (False, and refused, over its limit)."""
        assert self._meter is not None
        if self._in_p_data and not self._meter.feed(piece):
            self._refuse(P_DATA_TF, self._meter.message_bytes, self._meter.limit, "message", "PTX_MAX_FILE_BYTES")
            return False
        return True

    def _refuse(self, pdu_type: int, length: int, limit: int, what: str, setting: str | None) -> None:
        self.refused = (pdu_type, length)
        log.warning("DICOM peer %s sent a %s (PDU type 0x%02X) of %d bytes, over the limit of %d%s: aborted "
                    "before reading it", self._peer, what, pdu_type, length, limit,
                    f" ({setting})" if setting else "")
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = ABORT_SOURCE_PROVIDER, ABORT_INVALID_PARAMETER
        try:
            self._sock.sendall(abort.encode())
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the peer may be gone already; the connection ends either way
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def limited_request_handler(max_message: int | None, timeouts: PeerTimeouts | None = None) -> type[RequestHandler]:
    """pynetdicom's request handler class, reading each association's socket through `PduLimitedSocket`
    with the AE's `maximum_pdu_size` as the P-DATA limit and `max_message` bytes per DIMSE message; with
    `timeouts`, read deadlines from the moment of accept and TCP keepalive (service/pacs/connection_guard.py)."""

    class PduLimitedRequestHandler(RequestHandler):
        def setup(self) -> None:
            super().setup()
            peer = ":".join(str(part) for part in self.client_address[:2])
            deadlines = None
            if timeouts is not None:
                deadlines = PeerDeadlines(timeouts)
                try:
                    enable_keepalive(self.request, timeouts.network_s)
                except OSError:  # reset already: the first read finds the connection closed
                    pass
            self.request = PduLimitedSocket(self.request, int(self.ae.maximum_pdu_size or 0), peer, max_message,
                                            deadlines)

    return PduLimitedRequestHandler
