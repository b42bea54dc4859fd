"""The PACS side of the service, assembled: listener → spool → intake → store → DICOM results → delivery.

    C-STORE ─▶ DicomListener ─(spool, fsync, then success)─▶ Intake ─▶ ServedCascade.triage_spooled (as HTTP)
                                                              │ store.record_finding (worklist: upgrade only)
                                                              ├▶ Notifier → HL7 ORU^R01 (RIS) / signed webhook
                                                              └▶ SEG + SR (+ SC) + overlay PNG → results folder
                                                                  └▶ Dispatcher → C-STORE / STOW-RS destinations

Started by the HTTP edge when `PTX_DICOM_PORT` is set (one edge worker owns it: one intake per spool), on
the edge's event loop, after the model worker is ready. Why here and not in a separate service: the intake
triages through the edge's own coroutine, so films from the PACS join the same adaptive batches as HTTP.
With PTX_TRIAGE_URL the intake triages over HTTP instead (`remote_triage.RemoteTriage`): listener replicas
and triage replicas scale apart, and the films still join the triage replicas' batches. Several listeners
may share one store: each records its PTX_LISTENER_NAME with its instances, and its intake, retention and
gauges read only its own (service/pacs/intake.py).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable

import numpy as np
from PIL import Image
from pydicom import dcmread

from service.cascade.finding import Finding
from service.metrics import child, metrics
from service.pacs.delivery import Backoff, Dispatcher, make_senders, parse_destinations
from service.pacs.intake import Intake
from service.pacs.listener import DicomListener
from service.pacs.notify import NOTIFY_OUTCOMES, Notifier
from service.pacs.remote_triage import OUTCOMES as REMOTE_OUTCOMES
from service.pacs.remote_triage import RemoteTriage
from service.pacs.results import build_results
from service.pacs.retention import SWEEP_EVERY_S, Retention
from service.pacs.spool import Spool
from service.settings import Settings
from service.store import ResultsStore
from service.store.results_files import ResultsFolder

log = logging.getLogger("ptx.pacs")
OVERLAY_PNG_SIDE = 1024
OUTPUTS_RETRY_MAX_S = 3600.0  # PTX_OUTPUTS_RETRY_S doubles up to an hour (issue 13 §9)


def overlay_png(pixels: np.ndarray) -> bytes:
    """The Secondary Capture's pixels (banner, film, outline) as a PNG of at most 1024 px a side."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    image.thumbnail((OVERLAY_PNG_SIDE, OVERLAY_PNG_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Pacs:
    """Owns the listener, the intake and the dispatcher; `start()` / `stop()` on the edge's event loop.

    `triage` is the in-process call (`ServedCascade.triage_spooled`); with PTX_TRIAGE_URL set, a
    `RemoteTriage` to that URL is used instead (checked here: TriageUrlError names the setting)."""

    def __init__(self, settings: Settings, store: ResultsStore, results: ResultsFolder,
                 triage: Callable[[bytes], Awaitable[Finding]],
                 observe_notification: Callable[[float], None] | None = None,
                 on_attempt: Callable[[str, bool], None] | None = None,
                 on_dicom_outcome: Callable[[str], None] | None = None,
                 on_notification: Callable[[str, str], None] | None = None,
                 on_remote_outcome: Callable[[str], None] | None = None) -> None:
        self.remote = None if not settings.triage_url else RemoteTriage(
            settings.triage_url, None if settings.triage_token is None else settings.triage_token.get_secret_value(),
            settings.triage_timeout_s, default_wait_s=settings.retry_after_s, on_outcome=on_remote_outcome)
        triage = triage if self.remote is None else self.remote
        self.settings, self.store, self.results, self.triage = settings, store, results, triage
        # PTX_NOTIFY_*: checked here, so a webhook without its secret (or any bad value) stops the PACS side.
        self.notifier = Notifier.from_settings(settings, store, results, on_outcome=on_notification)
        self.spool = Spool(settings.data_dir / "spool")
        self._gauges: asyncio.Task[None] | None = None
        self._sweeps: asyncio.Task[None] | None = None
        self.retention = (Retention(store, results, self.spool, settings.retention_days,
                                    listener=settings.listener_name) if settings.retention_days > 0 else None)
        destinations = parse_destinations(settings.destinations)
        self.dispatcher = None
        if destinations:
            senders = make_senders(destinations, calling_ae=settings.dicom_ae_title)
            self.dispatcher = Dispatcher(store, senders, backoff=Backoff(settings.delivery_backoff_s, 2.0,
                                                                         settings.delivery_backoff_max_s),
                                         max_attempts=settings.delivery_max_attempts, on_attempt=on_attempt,
                                         results=results,  # another replica's objects from the database
                                         lease_s=settings.delivery_lease_s, owner=settings.listener_name)
        self.intake = Intake(self.spool, store, triage, workers=settings.intake_workers,
                             outputs_retry_s=settings.outputs_retry_s,
                             max_outputs_retry_s=max(OUTPUTS_RETRY_MAX_S, settings.outputs_retry_s),
                             on_finding=self._on_finding, observe_notification=observe_notification,
                             listener=settings.listener_name)
        self.listener = DicomListener.from_settings(settings, self.spool, store, on_received=self.intake.notify,
                                                    on_outcome=on_dicom_outcome)

    @classmethod
    def observed(cls, settings: Settings, store: ResultsStore, results: ResultsFolder,
                 triage: Callable[[bytes], Awaitable[Finding]]) -> Pacs:
        """The PACS side with its metrics: time to notification, delivery attempts, C-STORE outcomes, pushed
        notification attempts, triage calls over HTTP."""
        registry = metrics()
        pacs = cls(settings, store, results, triage, observe_notification=registry.notification_seconds.observe,
                   on_remote_outcome=lambda outcome: child(registry.remote_triage, outcome=outcome).inc(),
                   on_attempt=lambda destination, ok: child(registry.deliveries, destination=destination,
                                                            outcome="ok" if ok else "failed").inc(),
                   on_dicom_outcome=lambda outcome: child(registry.dicom_received, outcome=outcome).inc(),
                   on_notification=lambda channel, outcome: child(registry.notifications, channel=channel,
                                                                  outcome=outcome).inc())
        for channel in () if pacs.notifier is None else pacs.notifier.senders:
            for outcome in NOTIFY_OUTCOMES:  # every series at 0 from the start: increase() sees the first one
                child(registry.notifications, channel=channel, outcome=outcome)
        for outcome in () if pacs.remote is None else REMOTE_OUTCOMES:
            child(registry.remote_triage, outcome=outcome)
        return pacs

    async def start(self) -> None:
        """Intake first (its start-up scan must not race the listener's first writes), then the listener."""
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.notifier is not None:
            self.notifier.start()
        await self.intake.start()
        await asyncio.to_thread(self.listener.start)
        self._gauges = asyncio.get_running_loop().create_task(self._watch())
        if self.retention is not None:
            self._sweeps = asyncio.get_running_loop().create_task(self._sweep())
        log.info("DICOM listener %s (%s) on port %s; triage %s; %s destination(s); notifications: %s",
                 self.settings.dicom_ae_title, self.settings.listener_name, self.listener.port,
                 "in this process" if self.remote is None else f"over HTTP at {self.remote.base}",
                 0 if self.dispatcher is None else len(self.dispatcher.senders),
                 "none" if self.notifier is None else ", ".join(self.notifier.senders))

    async def _watch(self, every_s: float = 5.0) -> None:
        """Spool depth, findings whose results are not made yet (outputs_pending, alerted on) and delivery
        states as gauges (queries, so on a timer, not per scrape). Spool depth and outputs pending are this
        listener's (its PTX_LISTENER_NAME): another listener reports its own."""
        registry = metrics()
        name = self.settings.listener_name
        while True:
            try:
                # Received over DICOM and not yet triaged, from the store: the spool also holds the files of
                # instances failed with internal_error, kept for a retry, which wait for nobody.
                depth = await asyncio.to_thread(
                    lambda: sum(1 for r in self.store.pending_instances(listener=name) if r.listener == name))
                counts = await asyncio.to_thread(self.store.delivery_counts)
                outputs = await asyncio.to_thread(
                    lambda: sum(1 for r in self.store.due_outputs(listener=name) if r.listener == name))
                registry.spool_depth.set(depth)
                registry.outputs_pending.set(outputs)
                for state, count in counts.items():
                    child(registry.delivery_states, state=state.value).set(count)
            except Exception:  # a failed reading must not stop the next one
                log.warning("could not read spool depth / outputs pending / delivery states", exc_info=True)
            await asyncio.sleep(every_s)

    async def _sweep(self, every_s: float = SWEEP_EVERY_S) -> None:
        """PTX_RETENTION_DAYS: old result folders and leftover spool files removed, at start and hourly."""
        assert self.retention is not None
        while True:
            try:
                await asyncio.to_thread(self.retention.sweep)
            except Exception:  # a failed sweep must not stop the next one
                log.warning("retention sweep failed", exc_info=True)
            await asyncio.sleep(every_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """The listener first (no new C-STORE), then the intake with `grace_s` for the films in progress."""
        for task in (self._gauges, self._sweeps):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.listener.stop)
        await self.intake.stop(grace_s)
        if self.remote is not None:
            await self.remote.aclose()
        if self.dispatcher is not None:
            await asyncio.to_thread(self.dispatcher.close)
        if self.notifier is not None:
            await asyncio.to_thread(self.notifier.close)

    async def _on_finding(self, data: bytes, finding: Finding) -> None:
        """Queue the pushed notifications first (a reader waits for them; they need no result object), then
        make the SEG / SR (/ SC) and the overlay PNG, keep them, queue them for every destination. A failure
        anywhere makes the intake run this again later (outputs pending): both queues are idempotent."""
        if self.notifier is not None:
            await self.notifier.notify_async(finding)
        written = await asyncio.to_thread(self._write_results, data, finding)
        if self.dispatcher is None:
            return
        for kind, object_uid, path in written:
            if kind == "SC" and not self.settings.send_overlay:
                continue
            await self.dispatcher.enqueue_async(str(finding.study_uid), object_uid, kind, path)

    def _write_results(self, data: bytes, finding: Finding) -> list[tuple[str, str, str]]:
        """The finding's objects from the header and pixels triage kept (`Finding.source`): no second parse
        or decode; a finding without them (not from the intake) has the film parsed and decoded here."""
        kept = finding.source
        source = kept.header if kept is not None and kept.header is not None else dcmread(io.BytesIO(data))
        made = build_results(source, finding, overlay=True, pixels=None if kept is None else kept.radiograph.pixels)
        study, sop = str(finding.study_uid), str(finding.sop_uid)
        written = []
        for kind, ds in (("SEG", made.seg), ("SR", made.sr), ("SC", made.overlay)):  # SEG first: the SR cites it
            if ds is None:
                continue
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            path = self.results.write(study, sop, f"{kind}.dcm", buffer.getvalue())
            written.append((kind, str(ds.SOPInstanceUID), str(path)))
            if kind == "SC":
                self.results.write(study, sop, "overlay.png", overlay_png(ds.pixel_array))
        return written
