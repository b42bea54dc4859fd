"""The intake drains the DICOM spool through triage, as HTTP (long: an instance's life up to its results).

    start: store.pending_instances() (resume after a restart) + spool files the store does not know
    then:  notify(sop_uid) from the listener, and a poll of the store as a safety net
    each:  mark processing → spool.read → triage(bytes) → store.record_finding → on_finding → spool.remove
             RadiographError            → failed with its code (it can never succeed), spool file removed
             any other exception        → back to received, retried with exponential backoff; after
                                          `max_attempts` starts → failed "internal_error", spool file
                                          kept for an operator's retry (store.retry_instance)
             on_finding raises          → outputs_pending (store.defer_outputs), spool file kept, made
                                          again after `outputs_retry_s`, doubling to `max_outputs_retry_s`

Why asyncio tasks and not a thread pool: the service's triage (`ServedCascade.triage`) is a coroutine on the
edge's event loop (it awaits the batching model worker and runs decoding in its own threads), so the intake
runs as `workers` tasks on that loop and awaits it: `triage` is `Callable[[bytes], Awaitable[Finding]]` (a
synchronous one goes through `asyncio.to_thread`). Store and spool calls block, so they run in threads.

Attempts are the store's (`mark_instance(PROCESSING)` counts one), so they survive restarts: an instance
that kills the process every time it is triaged is failed after `max_attempts` restarts instead of looping.
`triage` should wait rather than raise when the service is momentarily overloaded: every exception other
than a RadiographError spends an attempt.

The finding is recorded before `on_finding` (SEG/SR generation and delivery) runs: the worklist priority is
what a reader waits for, and a fault in output generation must neither hold it back nor lose the results:
the instance is outputs_pending in the store (visible in its study, counted by a gauge) with its spool file
kept. Retry times are the store's, so retries outlive a restart, and each start tries every outputs_pending
instance once (a restart often follows the fix). A crash between recording and removing the file leaves a
done instance with its file: the next start makes it outputs_pending. Objects made again get the same UIDs
(`ResultIdentity.uid`) and deliveries are keyed by object UID: nothing is sent twice as two objects. Without
`on_finding` no objects are made; retries waiting for their time do not hold up `wait_idle`.

Exactly one intake drains a spool (one process): two would triage the same instances twice. Start the intake
before the listener, so that its start-up scan does not race the listener's first writes. Several listeners
(each its spool, its PTX_LISTENER_NAME) may share one store: an intake given its listener's `listener` name
resumes, polls and retries only the instances that listener recorded, so a restart never fails another's
films for a spool file it cannot see. Rows from before listener names (store migration 7) are adopted by the
intake whose spool holds their file, and left alone by the others.
Logs carry SOP Instance UIDs, codes and exception types, never exception messages from decoders (they may
quote attribute values) nor patient attributes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from pydicom import dcmread

from service.cascade.finding import Finding
from service.imaging.radiograph import RadiographError
from service.log_safety import describe_exception
from service.pacs.spool import Spool
from service.store import (
    INTERNAL_ERROR,
    SPOOL_MISSING,
    FindingRecord,
    InstanceRecord,
    InstanceStatus,
    NotFoundError,
    ReceivedInstance,
    ResultsStore,
    utc_now,
)

log = logging.getLogger("ptx.intake")

TriageCall = Callable[[bytes], Awaitable[Finding]]  # a film's bytes → its Finding (ServedCascade.triage_spooled)
FindingHook = Callable[[bytes, Finding], Awaitable[None]]

RECOVERED_SOURCE = "spool"  # a spooled instance whose receipt was never recorded (crash between the two)


class Intake:
    """`workers` tasks triaging spooled instances; `start()` and `stop()` on the event loop that runs triage.

    `observe_notification(seconds)`: time from C-STORE receipt (the store's `received_at`) to the finding
    being recorded, for a histogram. `poll_interval_s`: how often the store is checked for instances whose
    notification was missed (or that another process received) and for outputs retries come due. `listener`:
    the name the listener filling this spool records (PTX_LISTENER_NAME); None takes every spooled instance.
    """

    def __init__(self, spool: Spool, store: ResultsStore, triage: TriageCall, *, workers: int = 2,
                 max_attempts: int = 5, retry_delay_s: float = 2.0, max_retry_delay_s: float = 300.0,
                 outputs_retry_s: float = 30.0, max_outputs_retry_s: float = 3600.0,
                 poll_interval_s: float = 10.0, on_finding: FindingHook | None = None,
                 observe_notification: Callable[[float], None] | None = None,
                 clock: Callable[[], datetime] = utc_now, listener: str | None = None) -> None:
        if workers < 1 or max_attempts < 1:
            raise ValueError(f"workers and max_attempts must be at least 1, got {workers} and {max_attempts}")
        if not 0 < outputs_retry_s <= max_outputs_retry_s:
            raise ValueError(f"need 0 < outputs_retry_s <= max_outputs_retry_s, got {outputs_retry_s} and "
                             f"{max_outputs_retry_s}")
        self.spool, self.store, self.triage = spool, store, triage
        self.workers, self.max_attempts = workers, max_attempts
        self.retry_delay_s, self.max_retry_delay_s = retry_delay_s, max_retry_delay_s
        self.outputs_retry_s, self.max_outputs_retry_s = outputs_retry_s, max_outputs_retry_s
        self.poll_interval_s = poll_interval_s
        self.on_finding, self.observe_notification = on_finding, observe_notification
        self.clock = clock
        self.listener = listener  # None: every spooled instance in the store is this intake's (one listener)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tracked: set[str] = set()  # queued, in progress or waiting for a retry
        self._attempts: dict[str, int] = {}
        self._failures: dict[str, int] = {}  # unexpected exceptions in this process, for the backoff
        self._received_at: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None] | None] = set()  # workers inside one instance (stop waits for them)
        self._stopping = False
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._finished_since_poll: set[str] = set()
        self._outputs_only: set[str] = set()  # recorded, results to make (outputs_pending): no triage record
        self._outputs_timers: dict[str, asyncio.TimerHandle] = {}  # outputs retries waiting for their time
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume what a previous run left (pending instances, unrecorded spool files), then start workers."""
        if self._tasks:
            raise RuntimeError("the intake is already running")
        self._loop, self._stopping = asyncio.get_running_loop(), False
        self._queue, self._idle = asyncio.Queue(), asyncio.Event()  # bound to this loop (a restart may use another)
        for table in (self._tracked, self._attempts, self._failures, self._received_at, self._outputs_only):
            table.clear()
        self._idle.set()
        records = await asyncio.to_thread(self._recover)
        for record in records:
            self._track(record)
        self._tasks = [asyncio.create_task(self._work(), name=f"ptx-intake-{n}") for n in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._poll(), name="ptx-intake-poll"))
        log.info("intake started: %d worker(s), %d instance(s) to resume", self.workers, len(records))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop: no new instance is taken up; those being triaged get `grace_s` to finish (record, results),
        then every worker is cancelled. A cancelled one stays pending in the store and resumes at the next start
        (SIGTERM drains with PTX_DRAIN_TIMEOUT_S; issue 13 §10)."""
        self._stopping = True
        for handle in [*self._retries.values(), *self._outputs_timers.values()]:
            handle.cancel()
        self._retries, self._outputs_timers = {}, {}
        busy = [task for task in self._tasks if task in self._busy]
        if busy and grace_s > 0:
            log.info("intake stopping: %d instance(s) in progress get %.0f s to finish", len(busy), grace_s)
            await asyncio.wait(busy, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._loop = None
        log.info("intake stopped")

    def notify(self, sop_uid: str) -> None:
        """A new instance was received (the listener's `on_received`). Safe from any thread; never blocks."""
        loop = self._loop
        if loop is None:
            return  # not running: start() will find it in the store
        try:
            loop.call_soon_threadsafe(self._enqueue, sop_uid)
        except RuntimeError:  # the loop closed under us: the next start resumes it
            pass

    async def wait_idle(self, timeout_s: float | None = None) -> None:
        """Until nothing is queued, in progress or waiting for a retry (tests, orderly shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    # --- recovery -----------------------------------------------------------------------------------------

    def _recover(self) -> list[InstanceRecord]:
        """Runs in a thread at start: what to resume, instances without bytes failed, orphan files adopted,
        outputs_pending instances tried at once (with `on_finding`)."""
        resumable = []
        listed = self.store.due_outputs(listener=self.listener)
        outputs = self._mine(listed)
        if self.on_finding is not None:
            self._outputs_only.update(r.sop_uid for r in outputs)
            resumable.extend(outputs)
        pending = [r for r in self.store.pending_instances(listener=self.listener)
                   if r.spool_path is not None]  # None: HTTP's own
        records = self._mine(pending)
        elsewhere = len(pending) + len(listed) - len(records) - len(outputs)
        if elsewhere:
            log.info("%d instance(s) received before listener names have their spool file elsewhere: left for "
                     "the listener that holds it", elsewhere)
        for record in records:
            if not self.spool.exists(record.sop_uid):
                log.error("instance %s is pending but its spool file is gone; marked failed (%s)",
                          record.sop_uid, SPOOL_MISSING)
                self.store.mark_instance(record.sop_uid, InstanceStatus.FAILED, SPOOL_MISSING)
            else:
                resumable.append(record)
        known = {r.sop_uid for r in (*pending, *listed)}  # an outputs_pending instance keeps its file
        for sop_uid in self.spool.pending():
            if sop_uid not in known:
                adopted = self._adopt(sop_uid)
                if adopted is not None:
                    resumable.append(adopted)
        return resumable

    def _mine(self, records: list[InstanceRecord]) -> list[InstanceRecord]:
        """Of spooled instances read from the store (a thread), those this intake may take: its listener's,
        and unowned ones (from before store migration 7) whose file is in this spool, adopted now. Another
        listener's, or an unowned one whose file is not here, stays as it is: its file is in another spool,
        and failing it for spool_missing would lose a film that listener acknowledged. Without a `listener`
        name, all of them (one listener on the store)."""
        if self.listener is None:
            return records
        mine = []
        for record in records:
            if record.listener == self.listener:
                mine.append(record)
            elif record.listener is None and self.spool.exists(record.sop_uid):
                adopted = self.store.adopt_instance(record.sop_uid, self.listener)
                if adopted is not None:
                    log.info("instance %s (received before listener names) adopted: its file is in this spool",
                             record.sop_uid)
                    mine.append(adopted)
        return mine

    def _foreign(self, record: InstanceRecord) -> bool:
        """Whether another listener recorded this instance (so its own spool holds the film)."""
        return None not in (self.listener, record.listener) and record.listener != self.listener

    def _adopt(self, sop_uid: str) -> InstanceRecord | None:
        """A spool file the store does not list as pending: a crash between spooling and recording its
        receipt (the sender got no success; keep it anyway), or a leftover of a finished instance (remove)."""
        try:
            dataset = dcmread(self.spool.path(sop_uid), stop_before_pixels=True)
            study_uid = str(dataset.StudyInstanceUID)
            series_uid = str(dataset.get("SeriesInstanceUID", "") or "") or None
            sop_class_uid = str(dataset.get("SOPClassUID", "") or "") or None
            received = ReceivedInstance(sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
                                        sop_class_uid=sop_class_uid, source=RECOVERED_SOURCE,
                                        spool_path=str(self.spool.path(sop_uid)), received_at=self.clock(),
                                        listener=self.listener)
        except Exception as exc:  # noqa: BLE001 -- unreadable, and never acknowledged: nothing to keep
            log.warning("spool file %s is unreadable (%s) and was never recorded; removed", sop_uid,
                        describe_exception(exc))
            self.spool.remove(sop_uid)
            return None
        if self.store.receive(received):
            log.warning("spool file %s had no receipt recorded (interrupted C-STORE); adopted", sop_uid)
            return InstanceRecord(**vars(received), status=InstanceStatus.RECEIVED, error_code=None, attempts=0,
                                  updated_at=received.received_at)
        record = self.store.instance(sop_uid)
        if record is not None and self._foreign(record):
            # The same film reached two listeners at once (both spooled it, the other recorded it first), or
            # a crash here before recording: the other listener triages its own copy; this one was never
            # acknowledged as ours.
            log.info("spool file %s is a copy of an instance another listener holds; removed", sop_uid)
            self.spool.remove(sop_uid)
            return None
        if record is not None and record.status is InstanceStatus.DONE and self.on_finding is not None:
            # Recorded, then the process died before the file was removed, which comes after the results:
            # some may be missing. Make them again (same UIDs: idempotent, see ResultIdentity.uid).
            log.warning("spool file %s belongs to a triaged instance whose results may be incomplete "
                        "(interrupted); outputs pending, made again", sop_uid)
            self._outputs_only.add(sop_uid)
            return self.store.defer_outputs(sop_uid, self.clock())
        if record is not None and record.status is InstanceStatus.FAILED and record.error_code == INTERNAL_ERROR:
            log.info("spool file %s belongs to an instance failed with %s; kept for a retry", sop_uid, INTERNAL_ERROR)
        elif record is not None and record.status in (InstanceStatus.DONE, InstanceStatus.FAILED):
            log.info("spool file %s belongs to a finished instance; removed", sop_uid)
            self.spool.remove(sop_uid)
        elif record is not None:
            return record  # received since the scan began (a listener already running): resume it
        else:
            log.warning("spool file %s is known to the store under another study; left in place", sop_uid)
        return None

    # --- scheduling (all on the loop thread) --------------------------------------------------------------

    def _track(self, record: InstanceRecord) -> None:
        self._attempts[record.sop_uid] = max(record.attempts, self._attempts.get(record.sop_uid, 0))
        self._received_at.setdefault(record.sop_uid, record.received_at)
        self._enqueue(record.sop_uid)

    def _enqueue(self, sop_uid: str) -> None:
        if sop_uid in self._tracked:
            return
        self._tracked.add(sop_uid)
        self._idle.clear()
        self._queue.put_nowait(sop_uid)

    def _retry_later(self, sop_uid: str) -> None:
        failures = self._failures.get(sop_uid, 1)
        delay = min(self.retry_delay_s * 2 ** (failures - 1), self.max_retry_delay_s)
        assert self._loop is not None
        self._retries[sop_uid] = self._loop.call_later(delay, self._requeue, sop_uid)

    def _requeue(self, sop_uid: str) -> None:
        self._retries.pop(sop_uid, None)
        self._queue.put_nowait(sop_uid)  # still tracked

    def _untrack(self, sop_uid: str) -> None:
        self._tracked.discard(sop_uid)
        self._finished_since_poll.add(sop_uid)
        for table in (self._attempts, self._failures, self._received_at):
            table.pop(sop_uid, None)
        if not self._tracked:
            self._idle.set()

    async def _poll(self) -> None:
        """Track pending instances nobody told us about, and outputs retries come due without a timer (the
        store failed, say). The read is a snapshot: an instance finished while it ran is in
        `_finished_since_poll` and must not be taken up again (that would mark it processing and then fail
        it for its removed spool file)."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self._finished_since_poll = set()
            try:
                records = await asyncio.to_thread(self.store.pending_instances, None, self.listener)
                due = [] if self.on_finding is None else await asyncio.to_thread(self.store.due_outputs,
                                                                                self.clock(), self.listener)
                skip = self._tracked | self._finished_since_poll | self._outputs_timers.keys()
                mine = await asyncio.to_thread(
                    self._mine, [r for r in [*records, *due] if r.spool_path is not None and r.sop_uid not in skip])
            except Exception as exc:  # noqa: BLE001 -- the database may be briefly unavailable
                log.warning("intake poll failed (%s); retrying in %.0f s", describe_exception(exc),
                            self.poll_interval_s)
                continue
            skip = self._tracked | self._finished_since_poll | self._outputs_timers.keys()  # changed meanwhile
            for record in (r for r in mine if r.sop_uid not in skip):
                if record.status is InstanceStatus.OUTPUTS_PENDING:
                    self._outputs_only.add(record.sop_uid)
                self._track(record)

    async def _work(self) -> None:
        while not self._stopping:
            sop_uid = await self._queue.get()
            if self._stopping:  # stays pending in the store: the next start takes it up
                self._queue.task_done()
                return
            retrying = False
            me = asyncio.current_task()
            self._busy.add(me)
            try:
                retrying = await self._process(sop_uid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the store itself failed: leave it for the poll
                log.error("instance %s: bookkeeping failed (%s); left pending", sop_uid, describe_exception(exc))
            finally:
                self._busy.discard(me)
                self._queue.task_done()
                if not retrying and sop_uid not in self._retries:
                    self._untrack(sop_uid)

    # --- one instance ---------------------------------------------------------------------------------------

    async def _process(self, sop_uid: str) -> bool:
        """Triage one instance and record the outcome; True when it was scheduled for a retry."""
        if sop_uid in self._outputs_only:
            await self._remake_outputs(sop_uid)
            return False
        attempts = self._attempts.get(sop_uid, 0)
        if attempts >= self.max_attempts:
            await self._fail(sop_uid, INTERNAL_ERROR, f"{attempts} attempts started without an outcome")
            return False
        try:
            await asyncio.to_thread(self.store.mark_instance, sop_uid, InstanceStatus.PROCESSING)
        except NotFoundError:
            log.error("instance %s is spooled but unknown to the store; skipped", sop_uid)
            return False
        self._attempts[sop_uid] = attempts + 1
        try:
            data = await asyncio.to_thread(self.spool.read, sop_uid)
        except FileNotFoundError:
            await self._fail(sop_uid, SPOOL_MISSING, "its spool file is gone")
            return False
        try:
            finding = await self.triage(data)
        except RadiographError as exc:
            await self._fail(sop_uid, exc.code.value, exc.message)
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- anything else may be transient: retry, bounded
            return await self._failed_attempt(sop_uid, exc)
        await self._record(sop_uid, data, finding)
        return False

    async def _failed_attempt(self, sop_uid: str, exc: Exception) -> bool:
        attempts = self._attempts.get(sop_uid, 0)
        if attempts >= self.max_attempts:
            await self._fail(sop_uid, INTERNAL_ERROR, f"attempt {attempts} failed with {describe_exception(exc)}")
            return False
        self._failures[sop_uid] = self._failures.get(sop_uid, 0) + 1
        log.warning("instance %s: attempt %d of %d failed (%s); retrying", sop_uid, attempts, self.max_attempts,
                    describe_exception(exc))
        await asyncio.to_thread(self.store.mark_instance, sop_uid, InstanceStatus.RECEIVED)
        self._retry_later(sop_uid)
        return True

    async def _fail(self, sop_uid: str, code: str, why: str) -> None:
        """A final failure, recorded with its code. A rejection (the film's content) drops the spool file: it can
        never succeed. An internal error keeps it: after a fix an operator can send the instance through again
        (`POST /v1/instances/{sop_uid}/retry`); retention removes it in time."""
        await asyncio.to_thread(self.store.mark_instance, sop_uid, InstanceStatus.FAILED, code)
        if code != INTERNAL_ERROR:
            await asyncio.to_thread(self.spool.remove, sop_uid)
        log.info("instance %s failed: %s (%s)%s", sop_uid, code, why,
                 "; its spool file is kept for a retry" if code == INTERNAL_ERROR else "")

    async def _record(self, sop_uid: str, data: bytes, finding: Finding) -> None:
        if finding.sop_uid != sop_uid:  # the listener checks this on receipt; a file edited since would not
            await self._fail(sop_uid, "invalid_attribute", "the triaged film names another SOP Instance UID")
            return
        recorded_at = self.clock()
        recorded = await asyncio.to_thread(self.store.record_finding, FindingRecord.from_finding(finding, recorded_at))
        log.info("instance %s triaged: score %.3f, priority %s", sop_uid, finding.score, finding.priority.value)
        if recorded and self.observe_notification is not None:
            received_at = self._received_at.get(sop_uid) or await asyncio.to_thread(self._receipt, finding)
            if received_at is not None:
                self._observe((recorded_at - received_at).total_seconds())
        await self._finish(sop_uid, data, finding)

    async def _remake_outputs(self, sop_uid: str) -> None:
        """An outputs_pending instance: triaged again (the stored finding keeps its record; the objects get the
        same UIDs as before), then `_finish`. Bytes gone, or a film rejected now: settled with that code."""
        self._outputs_only.discard(sop_uid)
        try:
            data = await asyncio.to_thread(self.spool.read, sop_uid)
            finding = await self.triage(data)
        except (FileNotFoundError, RadiographError) as exc:
            code = SPOOL_MISSING if isinstance(exc, FileNotFoundError) else exc.code.value
            await asyncio.to_thread(self.store.settle_outputs, sop_uid, code)
            await asyncio.to_thread(self.spool.remove, sop_uid)
            log.error("instance %s: its results cannot be made (%s); its finding stands without them", sop_uid, code)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the model worker away, say: tried again later
            await self._outputs_failed(sop_uid, exc)
            return
        await self._finish(sop_uid, data, finding, pending=True)

    async def _finish(self, sop_uid: str, data: bytes, finding: Finding, pending: bool = False) -> None:
        """`on_finding`, then the spool file goes (and a `pending` instance is settled); when it fails, the
        instance is outputs_pending with its file kept (`_outputs_failed`)."""
        if self.on_finding is not None:
            try:
                await self.on_finding(data, finding)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the finding stands; its results are made again later
                await self._outputs_failed(sop_uid, exc)
                return
        if pending:
            await asyncio.to_thread(self.store.settle_outputs, sop_uid)
            log.info("instance %s: results made, outputs no longer pending", sop_uid)
        await asyncio.to_thread(self.spool.remove, sop_uid)

    async def _outputs_failed(self, sop_uid: str, exc: Exception) -> None:
        """outputs_pending, retried after `outputs_retry_s` doubled per failure (capped). A store that cannot
        record it (locked) gets the retry all the same; a restart would find the file of a done instance."""
        delay = self.outputs_retry_s
        try:
            record = await asyncio.to_thread(self.store.instance, sop_uid)
            failures = 1 + (0 if record is None else record.outputs_attempts)
            delay = min(self.outputs_retry_s * 2.0 ** min(failures - 1, 32), self.max_outputs_retry_s)
            await asyncio.to_thread(self.store.defer_outputs, sop_uid, self.clock() + timedelta(seconds=delay))
        except Exception as store_exc:  # noqa: BLE001 -- retried all the same, below
            log.error("instance %s: outputs_pending not recorded (%s)", sop_uid, describe_exception(store_exc))
        log.error("instance %s: its results could not be made (%s); spool file kept, next try in %.0f s", sop_uid,
                  describe_exception(exc), delay)
        assert self._loop is not None
        self._outputs_timers[sop_uid] = self._loop.call_later(delay, self._outputs_due, sop_uid)

    def _outputs_due(self, sop_uid: str) -> None:
        self._outputs_timers.pop(sop_uid, None)
        self._outputs_only.add(sop_uid)
        self._enqueue(sop_uid)

    def _receipt(self, finding: Finding) -> datetime | None:
        record = self.store.instance(finding.sop_uid) if finding.sop_uid else None
        return None if record is None else record.received_at

    def _observe(self, seconds: float) -> None:
        assert self.observe_notification is not None
        try:
            self.observe_notification(max(0.0, seconds))
        except Exception as exc:  # noqa: BLE001 -- a metrics fault must not fail triage
            log.warning("observe_notification failed (%s)", describe_exception(exc))

    def __repr__(self) -> str:
        return f"Intake(workers={self.workers}, tracked={len(self._tracked)})"


__all__ = ["INTERNAL_ERROR", "RECOVERED_SOURCE", "SPOOL_MISSING", "FindingHook", "Intake", "TriageCall"]
