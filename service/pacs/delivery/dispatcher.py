"""The dispatcher: deliveries queued in the store, sent by one thread per destination with backoff.

Several dispatchers (threads, processes, replicas) may drain one store: each round *claims* its rows for a
lease (service/store/claims.py: row locks with SKIP LOCKED on PostgreSQL), so no row is sent by two at once,
and rows a dispatcher did not get to, or left behind by dying, are due again when it releases them or when
the lease runs out.

So a row may be claimed by a replica that did not make its object: before sending, a path missing here is
fetched from the database's copy into this replica's results folder (`ResultsFolder.local_copy`, where
PTX_RESULTS_IN_DATABASE keeps one), and the copy is sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from service.log_safety import describe_exception
from service.pacs.delivery.backoff import Backoff
from service.pacs.delivery.cstore import CStoreSender
from service.pacs.delivery.destinations import DEFAULT_CALLING_AE, Destination
from service.pacs.delivery.sender import DeliveryError, Sender
from service.pacs.delivery.stow import StowSender
from service.store import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    Claim,
    DeliveryKind,
    DeliveryState,
    ResultsStore,
    StoreError,
)
from service.store.base import require_utc, utc_now
from service.store.claims import check_lease
from service.store.results_files import NotShared, ResultsFolder

LOG = logging.getLogger("service.pacs.delivery")


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

class Dispatcher:
    """Sends due deliveries and records every attempt; `start()` runs it on its own thread.

    `senders` maps each configured destination's name to its sender. A delivery whose destination is no
    longer configured is recorded as a failed attempt saying so (with the longest backoff), so it stays
    visible and ends failed rather than lingering or being dropped.

    `results`: this replica's results folder, through which an object another replica made is read from the
    database before it is sent (None: paths are sent as they are, the single-machine case).

    `on_attempt(destination, ok)` is called after each recorded attempt (a metrics counter); `counts()` is the
    store's count per state (a gauge). Each round claims its rows for `lease_s` and sends from the claim for
    half of it at most (then the rest go back, due): any number of dispatchers, `run_once` callers and
    `start()`ed threads may share a store.

    The outbox it drains is the store's deliveries; a subclass drains another outbox with the same threads,
    backoff and bookkeeping by overriding `_due`, `_release`, `_deliver`, `_store_attempt`, `_reported` and
    `noun` (the pushed notifications, service/pacs/notify/outbox.py).
    """

    noun = "delivery"  # what the log lines call one row of the outbox

    def __init__(self, store: ResultsStore, senders: Mapping[str, Sender], *, backoff: Backoff | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, batch_size: int = 32, poll_interval_s: float = 5.0,
                 clock: Callable[[], datetime] = utc_now, lease_s: float = DEFAULT_LEASE_S,
                 on_attempt: Callable[[str, bool], None] | None = None, rng: random.Random | None = None,
                 results: ResultsFolder | None = None, owner: str | None = None) -> None:
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
        self.lease_s = check_lease(lease_s)
        self.clock = clock
        self.on_attempt = on_attempt
        self.results = results
        self.owner = owner  # PTX_LISTENER_NAME: claims carry it; `start` releases what a killed self left claimed
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

    def wake(self, names: Iterable[str]) -> None:
        """Start these destinations' next rounds now (rows were added to the outbox by someone else)."""
        for name in names:
            wake = self._wakes.get(name)
            if wake is not None:
                wake.set()

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
        claim = self._due(at, destination, exclude)
        if not claim.rows:
            return 0
        # Past half the lease a row might be claimed again elsewhere once its lease ends: stop sending from it.
        deadline = time.monotonic() + self.lease_s / 2
        groups: dict[str, list[Any]] = {}
        for record in claim.rows:
            groups.setdefault(record.destination, []).append(record)
        try:
            if len(groups) == 1:
                return self._run_destination(*next(iter(groups.items())), at, claim.token, deadline)
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups),
                                                       thread_name_prefix="ptx-delivery-send") as pool:
                futures = [pool.submit(self._run_destination, name, records, at, claim.token, deadline)
                           for name, records in groups.items()]
                return sum(future.result() for future in futures)
        finally:
            self._give_back(claim.token, at)

    # -- what differs between outboxes (overridden for notifications) ---------------------------------

    def _due(self, at: datetime, destination: str | None, exclude: Collection[str]) -> Claim[Any]:
        """The rows due at `at` (at most a batch), of one destination or of all but `exclude`, claimed."""
        return self.store.claim_deliveries(self.batch_size, self.lease_s, now=at, destination=destination,
                                           exclude=exclude, owner=self.owner)

    def _release(self, token: str, at: datetime) -> int:
        """The claim's rows not attempted, due again at `at`."""
        return self.store.release_deliveries(token, at)

    def _release_owned(self, owner: str, at: datetime) -> int:
        """Every row still claimed under `owner` (a killed run of this listener), due again at `at`."""
        return self.store.release_owned_deliveries(owner, at)

    def _deliver(self, sender: Any, record: Any) -> None:
        """Send one row; raises DeliveryError."""
        sender.send(self._local(record.path))

    def _local(self, path: str) -> str | Path:
        """The row's file on this replica: its own path where it is here, else the database's copy written
        under this replica's results folder. Where neither has it, the path as it is (the sender then says
        the object file is missing, as before)."""
        if self.results is None or Path(path).is_file():
            return path
        try:
            return self.results.local_copy(path)
        except NotShared as error:  # retryable: the replica that made it may claim the row in a later round
            raise DeliveryError(f"{error.name} ({error.size} bytes) is over PTX_RESULTS_DATABASE_MAX_BYTES: only "
                                f"the replica that made it can send it", retryable=True) from None
        except (FileNotFoundError, ValueError):  # not in the database either, or not a results path
            return path
        except StoreError as error:
            raise DeliveryError(f"the object's copy in the results store could not be read: {error.message}",
                                retryable=True) from None

    def _store_attempt(self, record: Any, ok: bool, error: str | None, next_at: datetime | None,
                       claim: str | None) -> Any:
        """Record one attempt under `claim`; returns the row as it is now (`state`, `attempts`, `max_attempts`)."""
        return self.store.delivery_attempt(record.id, ok, error=error, next_attempt_at=next_at, claim=claim)

    def _reported(self, record: Any, updated: Any, ok: bool) -> None:
        """After an attempt is recorded: the metrics hook."""
        if self.on_attempt is not None:
            self.on_attempt(record.destination, ok)

    @staticmethod
    def _what(record: Any) -> str:
        """The row in a log line, beside its id: no UID, no patient attribute."""
        return str(record.kind.value)

    # -- sending -------------------------------------------------------------------------------------------

    def _run_destination(self, name: str, records: list[Any], now: datetime, claim: str | None = None,
                         deadline: float = float("inf")) -> int:
        sender = self.senders.get(name)
        down: DeliveryError | None = None
        recorded = 0
        for record in records:
            if self._stopping.is_set() or time.monotonic() > deadline:
                break  # given back at the end of the round: due again, for the next round or another dispatcher
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
            recorded += self._record(record, error, now, claim)
        return recorded

    def _send(self, sender: Any, record: Any) -> DeliveryError | None:
        started = time.monotonic()
        try:
            self._deliver(sender, record)
        except DeliveryError as error:
            return error
        except Exception as error:  # noqa: BLE001 -- a sender bug must not kill the round; kept visible, retried
            # Type and frames only: the message may quote a library's reading of the object or the peer.
            LOG.error("%s %d to %s: the sender raised %s", self.noun, record.id, record.destination,
                      describe_exception(error, depth=12))
            return DeliveryError(f"internal error in the sender ({type(error).__name__})", retryable=True)
        LOG.info("%s %d (%s) to %s: ok, delivered in %.2f s", self.noun, record.id, self._what(record),
                 record.destination, time.monotonic() - started)
        return None

    def _take_back_owned(self) -> None:
        """At start: rows this listener's name claimed before it was killed are due now, not when their lease
        ends (claims.py; one process runs under one listener name). A store that cannot answer: the lease."""
        if self.owner is None:
            return
        try:
            released = self._release_owned(self.owner, self.clock())
        except Exception:  # the rows come back when their lease runs out
            LOG.exception("%s claims of an earlier run could not be released; they are due when the lease ends",
                          self.noun)
            return
        if released:
            LOG.info("%d %s(s) claimed by an earlier run of this listener released", released, self.noun)

    def _give_back(self, token: str, at: datetime) -> None:
        """Release what the round claimed but did not attempt; if the store is unreachable the lease ends it."""
        try:
            self._release(token, at)
        except Exception:  # the round's outcome stands; the rows come back when their lease runs out
            LOG.exception("%s round could not give back its unsent rows; they are due when the lease ends", self.noun)

    def _record(self, record: Any, error: DeliveryError | None, now: datetime, claim: str | None = None) -> int:
        next_at = None
        if error is not None:
            attempts = record.attempts + 1
            with self._rng_lock:
                delay = self.backoff.delay_s(attempts, self._rng, longest=not error.retryable)
            if error.retry_after_s is not None:
                delay = min(self.backoff.max_s, max(delay, error.retry_after_s))
            next_at = now + timedelta(seconds=delay)
        try:
            updated = self._store_attempt(record, error is None, None if error is None else error.message[:2000],
                                          next_at, claim)
        except StoreError as store_error:  # e.g. our lease ran out and another claim holds it; the row says which
            LOG.error("%s %d to %s: could not record the attempt: %s", self.noun, record.id, record.destination,
                      store_error)
            return 0
        if error is not None:
            if updated.state.value == DeliveryState.FAILED.value:
                LOG.error("%s %d (%s) to %s failed for good after %d attempts: %s", self.noun, record.id,
                          self._what(record), record.destination, updated.attempts, error.message)
            else:
                LOG.warning("%s %d (%s) to %s: attempt %d of %d failed (%s), next at %s: %s", self.noun, record.id,
                            self._what(record), record.destination, updated.attempts, updated.max_attempts,
                            "retryable" if error.retryable else "rejected", next_at and next_at.isoformat(),
                            error.message)
        try:
            self._reported(record, updated, error is None)
        except Exception:
            LOG.exception("%s metrics hook failed", self.noun)
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
            self._take_back_owned()
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
        for name, sender in self.senders.items():
            try:
                sender.close()
            except Exception:
                LOG.exception("closing the sender for %s failed", name)

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
                LOG.exception("%s round for %s failed", self.noun, name or "unconfigured destinations")
                busy = False
            if not busy:
                wake.wait(self.poll_interval_s)
