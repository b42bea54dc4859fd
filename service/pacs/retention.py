"""Retention (PTX_RETENTION_DAYS): the service's copies of patient images and result objects do not outlive
their use.

    hourly ─▶ results/<study>/<sop>/   older than the limit and no delivery pending  ─▶ removed
           └▶ spool/<sop>.dcm          older than the limit and its instance finished ─▶ removed

What is swept and why:
* Result folders (SEG, SR, SC, overlay PNG of one instance; they carry the patient module): once sent, the
  PACS holds them and ours are a working copy for the API's links. A folder goes when its newest file is
  older than the limit, unless one of its objects still has a *pending* delivery (it would be sent from
  that file). A failed delivery does not keep its object: after the retention period nobody re-sends it.
* Spool files: the intake removes each once its instance is done or rejected; it keeps the file of an
  instance failed with internal_error (for an operator's retry), and a crash can leave one behind. Such a
  file goes when older than the limit. A file whose instance is pending (received, processing) is never
  touched, nor one whose instance is outputs_pending (its SEG/SR/SC are still to be made from it, however
  long the fault lasts: the ptx_outputs_pending gauge alerts), nor one the store does not know (a crash
  between spooling and recording: the intake adopts it at its next start). Each listener sweeps its own
  spool and reads only its own pending instances (PTX_LISTENER_NAME): another listener's files are not here.
* Result objects' database copies (PTX_RESULTS_IN_DATABASE, issue 17 §4) go with their folder, and on their
  own once older than the limit (the folder may have gone with another replica's volume).
* The database keeps its other rows (studies, instances, findings, deliveries): they hold UIDs, scores, masks
  as RLE, states and times, no patient attributes (docs/security.md), and they are the audit trail of what
  the service told the readers. Removing old rows is an operator's SQL statement, shown in docs/security.md.

Ages come from file modification times (a folder's newest file), compared with an injected clock, so the
tests run on a real store with real files and old mtimes rather than waiting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.imaging.uids import is_dicom_uid
from service.pacs.spool import Spool
from service.store import (
    DeliveryState,
    InstanceStatus,
    NotificationState,
    ResultsStore,
    utc_now,
)
from service.store.results_files import ResultsFolder

log = logging.getLogger("ptx.retention")

SWEEP_EVERY_S = 3600.0


@dataclass(frozen=True)
class SweepReport:
    results_removed: int = 0  # instance folders
    results_kept_pending: int = 0  # old folders kept for a pending delivery
    spool_removed: int = 0
    spool_kept: int = 0  # old spool files kept: instance pending or unknown to the store


class Retention:
    """One sweep over the results folder and the spool (`sweep`), for a limit of `days` (> 0)."""

    def __init__(self, store: ResultsStore, results: ResultsFolder, spool: Spool, days: float,
                 clock: Callable[[], datetime] = utc_now, listener: str | None = None) -> None:
        if not days > 0:
            raise ValueError(f"retention must be a positive number of days, got {days} (0 means: no sweep)")
        self.store, self.results, self.spool = store, results, spool
        self.limit = timedelta(days=days)
        self.clock = clock
        self.listener = listener  # PTX_LISTENER_NAME: only its pending instances are read (its spool's)

    def sweep(self) -> SweepReport:
        cutoff = (self.clock() - self.limit).timestamp()
        removed, kept = self._sweep_results(cutoff)
        spool_removed, spool_kept = self._sweep_spool(cutoff)
        report = SweepReport(removed, kept, spool_removed, spool_kept)
        if removed or spool_removed:
            log.info("retention (%s days): removed %d result folder(s) and %d spool file(s); kept %d old result "
                     "folder(s) with pending deliveries", self.limit.days, removed, spool_removed, kept)
        return report

    def _sweep_results(self, cutoff: float) -> tuple[int, int]:
        root = self.results.root
        pending = {Path(d.path).parent.resolve() for d in self.store.deliveries(state=DeliveryState.PENDING)}
        pending |= self._notifying()
        removed = kept = 0
        if self.results.objects is not None:
            removed += self._sweep_database(cutoff, pending)
        if not root.is_dir():
            return removed, kept
        for study in root.iterdir():
            if not (study.is_dir() and is_dicom_uid(study.name)):
                continue
            for instance in study.iterdir():
                if not (instance.is_dir() and is_dicom_uid(instance.name)):
                    continue
                newest = _newest_mtime(instance)
                if newest is None or newest >= cutoff:
                    continue
                if instance.resolve() in pending:
                    kept += 1
                    continue
                self.results.remove(study.name, instance.name)  # the folder and its database copies
                removed += 1
            try:
                study.rmdir()  # only when empty
            except OSError:
                pass
        return removed, kept

    def _sweep_database(self, cutoff: float, pending: set[Path]) -> int:
        """Database copies (PTX_RESULTS_IN_DATABASE) older than the limit whose writer's folder may be gone with
        its volume (a replica scaled away); kept while a delivery or notification of the instance is pending."""
        waiting = {(folder.parent.name, folder.name) for folder in pending}
        removed = 0
        for study_uid, sop_uid in self.results.stale_in_database(datetime.fromtimestamp(cutoff, UTC)):
            if (study_uid, sop_uid) not in waiting:
                self.results.remove(study_uid, sop_uid)
                removed += 1
        return removed

    def _notifying(self) -> set[Path]:
        """Instance folders whose notification is still being pushed: their `notification.json` holds the
        identifiers the HL7 message needs (service/pacs/notify), so they stay until it is sent or failed."""
        folders = set()
        for record in self.store.notifications(state=NotificationState.PENDING):
            try:
                sop_uid = json.loads(record.payload)["sop_uid"]
                folders.add(self.results.notification_path(record.study_uid, sop_uid).parent.resolve())
            except (ValueError, KeyError, TypeError):  # a payload without its film: nothing of it to keep
                continue
        return folders

    def _sweep_spool(self, cutoff: float) -> tuple[int, int]:
        active = {r.sop_uid for r in self.store.pending_instances(listener=self.listener)}
        removed = kept = 0
        for sop_uid in self.spool.pending():
            path = self.spool.path(sop_uid)
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if sop_uid in active or not self._finished(sop_uid):
                kept += 1
                continue
            self.spool.remove(sop_uid)
            removed += 1
        return removed, kept

    def _finished(self, sop_uid: str) -> bool:
        """Whether the store has this spooled instance as done or failed (not outputs_pending: still needed)."""
        record = self.store.instance(sop_uid)
        return record is not None and record.status in (InstanceStatus.DONE, InstanceStatus.FAILED)


def _newest_mtime(folder: Path) -> float | None:
    times = []
    for path in folder.iterdir():
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times) if times else None
