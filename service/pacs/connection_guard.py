"""Guards on each TCP connection to the DICOM port: who may connect, and how long a peer may keep us waiting.

pynetdicom bounds a silent peer between PDUs (its ARTIM timer before the A-ASSOCIATE-RQ, the network timeout
inside an association), but not one that stops half-way through a PDU: its reader blocks in `recv` until
the rest arrives, the association thread never ends, and it keeps its slot of PTX_DICOM_MAX_ASSOCIATIONS.
Measured on pynetdicom 3.0.4: twelve connections that each sent one byte refused every association (C-ECHO
included) for as long as they stayed open, and `stop()` never returned (aborting such an association waits
for its reader, which waits for the peer). So every read on an accepted socket gets a deadline
(`PeerDeadlines`):

    accept ──▶ the A-ASSOCIATE-RQ complete within PTX_DICOM_ACSE_TIMEOUT_S of the connection (PS3.8's ARTIM)
    a PDU  ──▶ no silence over PTX_DICOM_NETWORK_TIMEOUT_S once it has begun, and all of it within that
               timeout plus its length at `MIN_PDU_RATE` (a peer dripping a byte every few seconds ends)

A missed deadline closes the connection: pynetdicom sees the transport closed and the association ends (one
that never sent a whole A-ASSOCIATE-RQ when pynetdicom's own wait for it, the same ACSE timeout, ends;
before an association there is nobody to abort). TCP keepalive finds a peer that vanished without a FIN even where
nothing of ours is reading, e.g. while we wait to send it a response.

The allowlist is checked twice: here by address at accept (`GuardedServer.verify_request`), so a host that
no PTX_DICOM_ALLOWED_AES entry admits is closed before it holds a thread or a slot; and by calling AE title
and address on the A-ASSOCIATE-RQ (service/pacs/listener.py), which only then names the title.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from service.pacs.allowlist import CallingAeAllowlist

log = logging.getLogger("ptx.dicom")

# The slowest average rate a PDU may arrive at once it has begun, beyond the network timeout: a 256 KiB
# PDU (the default PTX_DICOM_MAX_PDU) gets 4 s more than the timeout; a drip of a byte every few seconds fails.
MIN_PDU_RATE = 64 * 1024  # bytes per second
KEEPALIVE_PROBES = 3


@dataclass(frozen=True)
class PeerTimeouts:
    """PTX_DICOM_ACSE_TIMEOUT_S (connection → complete A-ASSOCIATE-RQ) and PTX_DICOM_NETWORK_TIMEOUT_S
    (longest silence inside an association or a PDU), in seconds."""

    acse_s: float
    network_s: float

    def __post_init__(self) -> None:
        for name, value in (("acse_timeout_s", self.acse_s), ("network_timeout_s", self.network_s)):
            if not value > 0 or math.isinf(value):
                raise ValueError(f"the DICOM {name} must be a positive number of seconds, got {value!r}")


class PeerDeadlines:
    """When a peer's bytes are due, followed PDU by PDU (`pdu_started`, `pdu_length`, `pdu_ended` as the
    stream passes) from the moment of accept. `wait_s()` is how long the next read may block; `overdue()`
    says which deadline has passed, for the log line. The clock is injectable so the rules are tested
    without waiting."""

    def __init__(self, timeouts: PeerTimeouts, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeouts, self.clock = timeouts, clock
        self._association_due: float | None = clock() + timeouts.acse_s  # None once the first PDU is whole
        self._pdu_began: float | None = None
        self._pdu_due: float | None = None

    def pdu_started(self) -> None:
        """The first byte of a PDU header arrived: its length is not known yet."""
        self._pdu_began = self.clock()
        self._pdu_due = self._pdu_began + self.timeouts.network_s

    def pdu_length(self, length: int) -> None:
        """The PDU's header is complete and declares `length` bytes to follow."""
        began = self._pdu_began if self._pdu_began is not None else self.clock()
        self._pdu_due = began + self.timeouts.network_s + length / MIN_PDU_RATE

    def pdu_ended(self) -> None:
        """The PDU is complete: the next may take as long as pynetdicom allows between PDUs."""
        self._pdu_began = self._pdu_due = None
        self._association_due = None  # the first PDU (the A-ASSOCIATE-RQ) has arrived

    def wait_s(self) -> float:
        """Seconds the next read may block (at most the network timeout; 0 or less: overdue)."""
        now = self.clock()
        dues = [due for due in (self._association_due, self._pdu_due) if due is not None]
        return min([self.timeouts.network_s, *(due - now for due in dues)])

    def overdue(self) -> str:
        """Which deadline a read missed, naming its setting (for the log)."""
        now = self.clock()
        if self._association_due is not None and now >= self._association_due:
            return (f"no complete A-ASSOCIATE-RQ within {self.timeouts.acse_s:g} s of connecting "
                    "(PTX_DICOM_ACSE_TIMEOUT_S)")
        if self._pdu_due is not None and now >= self._pdu_due:
            return (f"a PDU not complete within {self.timeouts.network_s:g} s plus its length at "
                    f"{MIN_PDU_RATE // 1024} KiB/s (PTX_DICOM_NETWORK_TIMEOUT_S)")
        return f"silent for {self.timeouts.network_s:g} s in the middle of a PDU (PTX_DICOM_NETWORK_TIMEOUT_S)"


def enable_keepalive(sock: socket.socket, idle_s: float) -> None:
    """TCP keepalive on an accepted socket: the first probe after `idle_s` of silence, then every third of
    it, `KEEPALIVE_PROBES` unanswered ones and the kernel fails the connection (ETIMEDOUT on the next read
    or write). The per-probe options are Linux's (and most Unixes'); where one is missing the system's
    default applies."""
    idle = max(1, math.ceil(idle_s))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server that closes, at accept, a connection from an address no
    allowlist entry admits (no thread, no association, no slot). `allowlist` None: every address."""

    allowlist: CallingAeAllowlist | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allowlist is None:
            return True
        address = str(client_address[0])
        if self.allowlist.admits_address(address):
            return True
        log.warning("connection from %s:%s closed at accept: no PTX_DICOM_ALLOWED_AES entry admits that address",
                    address, client_address[1])
        return False  # socketserver then shuts the socket down and closes it

