"""Issue 13 §2: a stalled DICOM peer must not block intake (service/pacs/connection_guard.py).

Before: connections that each sent one byte (or dripped a byte every few seconds, so no read ever waited
long) kept their association slots for as long as they stayed open: every C-ECHO was refused (> 40 s
measured) and `stop()` never returned. Here raw sockets play the peers over real loopback networking, with
timeouts of a few seconds given to the listener's constructor; a C-ECHO from pynetdicom must then succeed
within the timeout plus a margin, and `stop()` must return promptly with the stalled sockets still open.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ

from service.pacs.allowlist import CallingAeAllowlist
from service.pacs.connection_guard import MIN_PDU_RATE, PeerDeadlines, PeerTimeouts
from tests.pacs.test_dicom_listener import Receiver, receiver, scu

TIMEOUT_S = 3.0  # both the ACSE and the network timeout of the listener under test
MARGIN_S = 3.0  # threads polling at 0.5 s, a loaded CI machine
DRIP_EVERY_S = 2.0  # shorter than TIMEOUT_S: no single read waits long enough to time out by itself
A_ASSOCIATE_RQ_HEAD = b"\x01\x00\x00\x00\x01\x00"  # an A-ASSOCIATE-RQ declaring 256 bytes to follow


def echo_ok(port: int) -> bool:
    assoc = scu().associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def closed_by_listener(sock: socket.socket, within_s: float) -> bool:
    """Whether the listener closes `sock` within `within_s` (EOF or reset on our side)."""
    sock.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


class Dripper:
    """Sends `stream` one byte every `every_s` from a thread until stopped or refused."""

    def __init__(self, sock: socket.socket, stream: bytes, every_s: float = DRIP_EVERY_S) -> None:
        self.sock, self.stream, self.every_s = sock, stream, every_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for index in range(len(self.stream)):
            try:
                self.sock.send(self.stream[index:index + 1])
            except OSError:
                return
            if self.stopped.wait(self.every_s):
                return


def one_byte(sock: socket.socket) -> None:
    sock.sendall(b"\x01")


def dripping(sock: socket.socket) -> None:
    Dripper(sock, A_ASSOCIATE_RQ_HEAD + bytes(256))


def half_closed(sock: socket.socket) -> None:
    """Part of a PDU, then our side's FIN: the peer keeps the connection open for reading only."""
    sock.sendall(A_ASSOCIATE_RQ_HEAD + bytes(10))
    sock.shutdown(socket.SHUT_WR)


def silent(sock: socket.socket) -> None:
    """Connected, and not a byte sent."""


PEERS: dict[str, Callable[[socket.socket], None]] = {
    "one byte then nothing": one_byte, "a byte every 2 s": dripping, "half-closed mid-PDU": half_closed,
    "silent": silent,
}


@contextmanager
def stalled(port: int, behave: Callable[[socket.socket], None], count: int) -> Iterator[list[socket.socket]]:
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        for sock in sockets:
            behave(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def wait_for_acceptors(rx: Receiver, count: int) -> None:
    """Until the listener has exactly `count` associations (accepted connections) open."""
    deadline = time.monotonic() + 5
    while len([a for a in rx.listener.ae.active_associations if a.is_acceptor]) != count:
        assert time.monotonic() < deadline, f"the listener never had {count} open connections"
        time.sleep(0.02)


@pytest.mark.parametrize("behaviour", list(PEERS), ids=list(PEERS))
def test_a_stalled_peer_releases_its_slot_within_the_acse_timeout(tmp_path: Path, behaviour: str) -> None:
    """More stalled connections than slots: C-ECHO is refused at first (the slots are really taken), then
    succeeds within PTX_DICOM_ACSE_TIMEOUT_S plus a margin of the connections, and each stalled socket has
    been closed by the listener."""
    with receiver(tmp_path, max_associations=2, acse_timeout_s=TIMEOUT_S, network_timeout_s=TIMEOUT_S) as rx:
        opened = time.monotonic()
        with stalled(rx.port, PEERS[behaviour], count=3) as sockets:
            wait_for_acceptors(rx, 3)
            assert not echo_ok(rx.port), "the stalled connections did not take the slots"
            while not echo_ok(rx.port):
                assert time.monotonic() - opened < TIMEOUT_S + MARGIN_S, f"slots still held ({behaviour})"
                time.sleep(0.2)
            for sock in sockets:
                left = TIMEOUT_S + MARGIN_S - (time.monotonic() - opened)
                assert closed_by_listener(sock, max(left, 0.1)), f"a stalled socket is still open ({behaviour})"


def association_request(port: int) -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends (Verification and CR storage), for a raw socket to replay."""
    sent: list[bytes] = []

    def keep(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RQ):
            sent.append(event.pdu.encode())

    assoc = scu().associate("127.0.0.1", port, ae_title="PTXTRIAGE", evt_handlers=[(evt.EVT_PDU_SENT, keep)])
    assert assoc.is_established
    assoc.release()
    return sent[0]


def read_pdu(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 6:
        head += sock.recv(6 - len(head))
    body = b""
    while len(body) < int.from_bytes(head[2:6], "big"):
        body += sock.recv(int.from_bytes(head[2:6], "big") - len(body))
    return head + body


def test_a_peer_dripping_a_pdu_inside_an_association_is_cut_off(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A raw peer associates, starts a P-DATA PDU and drips it, ignoring anything we send (an A-ABORT
    included): each byte comes sooner than the network timeout, but the PDU is not complete within the
    timeout plus its length at the minimum rate, so the listener closes the connection and the (only) slot
    is free again."""
    caplog.set_level("WARNING", logger="ptx.dicom")
    with receiver(tmp_path, max_associations=1, acse_timeout_s=TIMEOUT_S, network_timeout_s=TIMEOUT_S) as rx:
        request = association_request(rx.port)
        wait_for_acceptors(rx, 0)
        with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as raw:
            raw.sendall(request)
            assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC: the association is established
            started = time.monotonic()
            body = 1000
            dripper = Dripper(raw, b"\x04\x00" + body.to_bytes(4, "big") + bytes(body), every_s=1.0)
            try:
                allowed = TIMEOUT_S + body / MIN_PDU_RATE + MARGIN_S
                assert closed_by_listener(raw, allowed), "the dripping peer's connection is still open"
            finally:
                dripper.stopped.set()
        deadline = started + allowed + MARGIN_S
        while not echo_ok(rx.port):
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.2)
    assert any("a PDU not complete within 3 s" in r.getMessage() and "PTX_DICOM_NETWORK_TIMEOUT_S" in r.getMessage()
               for r in caplog.records), caplog.text


def test_stop_returns_promptly_with_stalled_peers_connected(tmp_path: Path) -> None:
    """Long timeouts (nothing would end the stalls by itself), three peers stalled mid-PDU and one idle
    established association: `stop()` returns within its grace plus a second or two, every connection is
    closed, and the established association's peer learns it was aborted."""
    with (receiver(tmp_path, acse_timeout_s=120, network_timeout_s=120) as rx,
          stalled(rx.port, one_byte, count=3) as sockets):
        held = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert held.is_established
        wait_for_acceptors(rx, 4)
        stopper = threading.Thread(target=rx.listener.stop, kwargs={"grace_s": 0.5}, daemon=True)
        started = time.monotonic()
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive(), "stop() is still waiting on the stalled peers"
        assert time.monotonic() - started < 4
        assert all(closed_by_listener(sock, 2) for sock in sockets)
        deadline = time.monotonic() + 5
        while held.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.is_aborted


def test_an_address_no_entry_admits_is_closed_at_accept(tmp_path: Path) -> None:
    """Before the peer says anything: no thread, no association, no slot for a host the allowlist does not
    name; an entry without an address (a bare title) admits every host."""
    with receiver(tmp_path, allowed_calling_aes=["PACS1@10.0.0.5", "MOD@192.0.2.0/24"]) as rx:
        with socket.create_connection(("127.0.0.1", rx.port), timeout=5) as sock:
            assert closed_by_listener(sock, 2)
        assert not [a for a in rx.listener.ae.active_associations if a.is_acceptor]
    with (receiver(tmp_path, allowed_calling_aes=["PACS1@10.0.0.5", "ANYWHERE"]) as rx,
          socket.create_connection(("127.0.0.1", rx.port), timeout=5) as sock):
        assert not closed_by_listener(sock, 0.5)  # kept, waiting for its A-ASSOCIATE-RQ
        wait_for_acceptors(rx, 1)


def test_admitted_addresses_are_the_union_of_the_entries() -> None:
    allow = CallingAeAllowlist.parse("PACS1@10.0.0.5, MOD@10.1.0.0/16, MOD@fd00::/8")
    assert allow.admits_address("10.0.0.5") and allow.admits_address("10.1.2.3") and allow.admits_address("fd00::9")
    assert allow.admits_address("::ffff:10.0.0.5")  # an IPv4 peer on a dual-stack socket
    assert not allow.admits_address("10.0.0.6") and not allow.admits_address("127.0.0.1")
    assert not allow.admits_address("not-an-address")
    assert CallingAeAllowlist.parse("PACS1@10.0.0.5, WORKSTATION").admits_address("198.51.100.7")


def test_accepted_sockets_have_tcp_keepalive(tmp_path: Path) -> None:
    """A peer that vanished without a FIN is found by the kernel: keepalive on, first probe after the
    network timeout (rounded up), then every third of it, three probes."""
    with (receiver(tmp_path, network_timeout_s=7.5) as rx,
          socket.create_connection(("127.0.0.1", rx.port), timeout=5)):
        wait_for_acceptors(rx, 1)
        (assoc,) = [a for a in rx.listener.ae.active_associations if a.is_acceptor]
        ours = assoc.dul.socket.socket
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == math.ceil(7.5)
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 8 // 3
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadlines_follow_the_association_request_then_each_pdu() -> None:
    clock = Clock()
    deadlines = PeerDeadlines(PeerTimeouts(acse_s=10, network_s=30), clock)
    assert deadlines.wait_s() == 10  # the A-ASSOCIATE-RQ is due 10 s after accept
    deadlines.pdu_started()
    clock.now += 4
    deadlines.pdu_length(68)
    assert deadlines.wait_s() == pytest.approx(6)
    clock.now += 6
    assert deadlines.wait_s() <= 0 and "PTX_DICOM_ACSE_TIMEOUT_S" in deadlines.overdue()

    deadlines = PeerDeadlines(PeerTimeouts(acse_s=10, network_s=30), clock)
    deadlines.pdu_started()
    deadlines.pdu_ended()  # the A-ASSOCIATE-RQ arrived whole: no association deadline any more
    assert deadlines.wait_s() == 30  # between PDUs: at most one network timeout per read
    deadlines.pdu_started()
    clock.now += 1
    deadlines.pdu_length(4 * MIN_PDU_RATE)  # 4 s of transfer allowed beyond the timeout, from its first byte
    assert deadlines.wait_s() == 30
    clock.now += 30
    assert deadlines.wait_s() == pytest.approx(3)
    clock.now += 3
    assert deadlines.wait_s() <= 0 and "a PDU not complete within 30 s" in deadlines.overdue()
    deadlines.pdu_ended()
    assert deadlines.wait_s() == 30
    assert "silent for 30 s" in deadlines.overdue()
    for bad in ((0, 30), (10, -1), (10, float("inf"))):
        with pytest.raises(ValueError, match="timeout_s must be a positive number"):
            PeerTimeouts(*bad)
