"""Exactly once (issue 17 §3): several dispatchers sharing one real PostgreSQL send each result object once.

The receiver is a real DICOM storage SCP (pynetdicom, in this process) that counts every C-STORE by SOP
Instance UID, duplicates included; the dispatchers are the service's own, each on its own store (its own
connections, as separate replicas would be), one of them in a separate process that is killed mid-send.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.pacs.delivery import Dispatcher, make_senders, parse_destinations
from service.store import DeliveryState, ResultsStore, open_store
from tests.pacs.test_delivery import STUDY, received, write_sc
from tests.servers import REPO, free_port

FAST = {"connect_timeout_s": 2.0, "timeout_s": 5.0}


class CountingScp:
    """A storage SCP that counts each C-STORE it is sent (on arrival, before answering after `delay_s`)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port, self.delay_s, self.seen = port, 0.0, Counter[str]()
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: object) -> int:
        with self._lock:
            self.seen[str(event.dataset.SOPInstanceUID)] += 1  # type: ignore[attr-defined]
        time.sleep(self.delay_s)
        return 0x0000

    @property
    def destination(self) -> str:
        return f"pacs=dicom://PACS@127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp() -> Iterator[CountingScp]:
    receiver = CountingScp(free_port())
    yield receiver
    receiver.close()


@pytest.fixture
def database(postgres_server, tmp_path) -> Iterator[tuple[str, ResultsStore]]:
    url = postgres_server.create_database()
    with open_store(url, tmp_path) as store:
        store.receive(received(STUDY))
        yield url, store


def queue(store: ResultsStore, folder: Path, count: int) -> list[str]:
    """`count` result objects queued for the destination `pacs`; their SOP Instance UIDs."""
    uids = []
    for n in range(count):
        path = folder / f"{n}.dcm"
        uids.append(write_sc(path))
        store.add_delivery(STUDY, uids[-1], "SC", "pacs", str(path))
    return uids


def wait_delivered(store: ResultsStore, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.delivery_counts()[DeliveryState.DELIVERED] < count:
        assert time.monotonic() < deadline, f"delivered {store.delivery_counts()} of {count} in {timeout_s} s"
        time.sleep(0.1)


def test_four_dispatchers_on_one_database_send_each_object_exactly_once(database, scp, tmp_path) -> None:
    url, store = database
    uids = queue(store, tmp_path / "out", 48)
    scp.delay_s = 0.02  # sends overlap: four dispatchers are busy at once
    attempts: Counter[int] = Counter()
    dispatchers = []
    for index in range(4):
        own = open_store(url, tmp_path)  # its own connections, as another replica's
        senders = make_senders(parse_destinations(scp.destination), calling_ae=f"PTX{index}", **FAST)
        dispatchers.append((own, Dispatcher(own, senders, batch_size=4, poll_interval_s=0.1, lease_s=60,
                                            on_attempt=lambda name, ok, i=index: attempts.update([i]))))
    for _, dispatcher in dispatchers:
        dispatcher.start()
    try:
        wait_delivered(store, len(uids), timeout_s=60)
    finally:
        for own, dispatcher in dispatchers:
            dispatcher.close()
            own.close()
    assert scp.seen == Counter(uids), "each object received exactly once"
    assert [d.attempts for d in store.deliveries()] == [1] * len(uids)
    assert len(attempts) > 1, f"the dispatchers shared the work: {dict(attempts)}"


DYING = """
import sys
from pathlib import Path
from service.pacs.delivery import Dispatcher, make_senders, parse_destinations
from service.store import open_store
url, data, destination, lease = sys.argv[1:5]
owner = sys.argv[5] if len(sys.argv) > 5 else None
store = open_store(url, Path(data))
senders = make_senders(parse_destinations(destination), calling_ae="PTXDYING", connect_timeout_s=2, timeout_s=30)
Dispatcher(store, senders, batch_size=10, lease_s=float(lease), owner=owner).run_once()
"""


def kill_in_first_send(url: str, scp: CountingScp, tmp_path: Path, lease_s: float, *owner: str) -> str:
    """A dispatcher process that claims the queue and is killed with SIGKILL in its first send; that send's UID."""
    scp.delay_s = 30.0  # the first object hangs at the receiver: the dispatcher is killed in that send
    dying = subprocess.Popen([sys.executable, "-c", DYING, url, str(tmp_path), scp.destination, str(lease_s), *owner],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not scp.seen:
            assert dying.poll() is None and time.monotonic() < deadline, "the first send never reached the SCP"
            time.sleep(0.05)
    finally:
        os.kill(dying.pid, signal.SIGKILL)
        dying.wait()
    (in_flight,) = scp.seen
    scp.delay_s = 0.0
    return in_flight


def test_a_dispatcher_killed_mid_send_leaves_its_objects_to_another(database, scp, tmp_path) -> None:
    url, store = database
    uids = queue(store, tmp_path / "out", 6)
    lease_s = 6.0
    in_flight = kill_in_first_send(url, scp, tmp_path, lease_s)
    assert store.due_deliveries() == [], "its claim holds every row until the lease ends"

    survivor_store = open_store(url, tmp_path)
    senders = make_senders(parse_destinations(scp.destination), calling_ae="PTXSURVIVOR", **FAST)
    survivor = Dispatcher(survivor_store, senders, batch_size=10, poll_interval_s=0.2, lease_s=lease_s)
    survivor.start()
    try:
        wait_delivered(store, len(uids), timeout_s=60)
    finally:
        survivor.close()
        survivor_store.close()
    duplicates = {uid for uid, count in scp.seen.items() if count > 1}
    assert set(scp.seen) == set(uids) and duplicates <= {in_flight}, "only the send cut short went twice"
    assert [d.state for d in store.deliveries()] == [DeliveryState.DELIVERED] * len(uids)
    assert [d.attempts for d in store.deliveries()] == [1] * len(uids), "the dead dispatcher recorded nothing"


def test_a_listener_killed_mid_send_sends_its_claimed_objects_at_once_when_it_starts_again(database, scp,
                                                                                            tmp_path) -> None:
    """Issue 17 §5: the claim names its listener (PTX_LISTENER_NAME); the same listener, started again, takes
    its rows back at once instead of after the lease (here 300 s, the default); another listener's start does
    not. Before, the burst test's restarted listener left 8 deliveries pending for the whole lease."""
    url, store = database
    uids = queue(store, tmp_path / "out", 6)
    in_flight = kill_in_first_send(url, scp, tmp_path, 300.0, "pacs-0")
    senders = make_senders(parse_destinations(scp.destination), calling_ae="PTXAGAIN", **FAST)
    others = [open_store(url, tmp_path) for _ in range(2)]
    try:
        other = Dispatcher(others[0], senders, batch_size=10, poll_interval_s=0.2, lease_s=300, owner="pacs-1")
        other.start()
        time.sleep(2.0)
        other.close()
        assert store.delivery_counts()[DeliveryState.DELIVERED] == 0, "another listener's start takes nothing"
        again = Dispatcher(others[1], senders, batch_size=10, poll_interval_s=0.2, lease_s=300, owner="pacs-0")
        again.start()
        try:
            wait_delivered(store, len(uids), timeout_s=60)
        finally:
            again.close()
    finally:
        for own in others:
            own.close()
    duplicates = {uid for uid, count in scp.seen.items() if count > 1}
    assert set(scp.seen) == set(uids) and duplicates <= {in_flight}, "only the send cut short went twice"
