"""The dispatcher: deliveries queued in the store, sent by one thread per destination with backoff."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from service.pacs.delivery.cstore import CStoreSender
from service.pacs.delivery.destinations import DEFAULT_CALLING_AE, Destination
from service.pacs.delivery.sender import DeliveryError, Sender
from service.pacs.delivery.stow import StowSender
from service.store import (
    DEFAULT_MAX_ATTEMPTS,
    DeliveryKind,
    DeliveryRecord,
    DeliveryState,
    ResultsStore,
    StoreError,
)
from service.store.base import require_utc, utc_now

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
