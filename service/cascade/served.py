"""The served cascade: admission control, the flow with the model worker's calls, and the per-film metrics.

One object per edge worker; the HTTP routes and the DICOM intake both triage through `triage`, so films
from the PACS join the same adaptive batches as HTTP uploads. CPU steps run in threads, at most
`decode_threads` at once (never on the event loop).

Admission (`admitted`) is a slot of PTX_MAX_IN_FLIGHT taken before a request's body is read: what the edge
holds in memory for bodies is bounded by the admitted requests, and a refusal costs no upload (issue 13 §8).
Once a drain began (SIGTERM, `service/http/drain.py`) nothing new is admitted; films already admitted finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from service.cascade.finding import Finding
from service.cascade.flow import Flow, ModelCall, Timings
from service.errors import ServiceError, unavailable
from service.imaging.radiograph import RadiographError
from service.imaging.reduced import FALLBACK_REASONS
from service.metrics import child, metrics
from service.models.worker_client import overloaded
from service.settings import Settings

log = logging.getLogger("ptx.cascade")


def count_rejection(code: str) -> None:
    child(metrics().rejections, code=code).inc()


def count_ood(registry: Any, finding: Finding) -> None:
    """ptx_ood_total{flag="in"|"out"}: films read against the classifier's OOD description (none where its
    manifest has none); a rising "out" share is data drift (deploy/prometheus, issue 16)."""
    if finding.ood is not None:
        child(registry.ood, flag="out" if finding.ood.flag else "in").inc()


def shutting_down(retry_after_s: int) -> ServiceError:
    """503 `shutting_down`: this edge is draining after SIGTERM; another replica (or this one restarted) can."""
    return unavailable("shutting_down", "the service is shutting down (SIGTERM); retry later or on another "
                                        "replica", retry_after_s)


async def until_available(call: Callable[[], Awaitable[Any]], pause_s: float) -> Any:
    """`await call()`, again every `pause_s` while it raises a 503 (a model out of service, a full batch queue).

    For the DICOM intake: an acknowledged film waits in the spool for the model to come back, without
    spending one of its attempts -- it must not be failed (and dropped from the spool) for an outage.
    """
    warned = False
    while True:
        try:
            return await call()
        except ServiceError as exc:
            if exc.http_status != 503:
                raise
            if not warned:
                log.warning("intake waiting for the service (%s); the film stays spooled", exc.code_text)
                warned = True
            await asyncio.sleep(pause_s)


class ServedCascade:
    """Triage for the edge: `triage(payload)` → `Finding`, raising `ServiceError`s for the caller to answer."""

    def __init__(self, flow: Flow, settings: Settings, classify: ModelCall, segment: ModelCall,
                 describe: Callable[[], Awaitable[dict[str, str]]] | None = None) -> None:
        self.flow, self.settings = flow, settings
        self.classify, self.segment, self.describe = classify, segment, describe  # describe: None once done
        self.limiter = anyio.CapacityLimiter(settings.decode_threads)
        self.in_flight = 0  # admitted slots: HTTP requests (reading or triaging) and the intake's films
        self.draining = False
        for reason in FALLBACK_REASONS:  # exported at 0 from the start: a dashboard shows none, not "no data"
            child(metrics().decode_fallbacks, reason=reason)

    async def in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """CPU work off the event loop, at most `decode_threads` at once."""
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def ensure_described(self) -> bool:
        """Learn once which engine runs each model (the model worker knows; answers name it); True once known."""
        if self.describe is not None:
            self.flow = self.flow.with_backends(await self.describe())
            self.describe = None
        return True

    @contextmanager
    def admitted(self, films: int = 1, *, beyond_limit: bool = False) -> Iterator[None]:
        """Hold `films` slots of PTX_MAX_IN_FLIGHT for the block: 503 `overloaded` (Retry-After) when they are
        taken, 503 `shutting_down` once draining. `beyond_limit` (the intake's spooled films, already
        acknowledged and bounded by its own workers) counts without being refused for capacity."""
        if self.draining:
            raise shutting_down(self.settings.retry_after_s)
        limit = self.settings.max_in_flight
        if not beyond_limit and self.in_flight + films > limit:
            raise overloaded(f"{self.in_flight} films in progress (PTX_MAX_IN_FLIGHT={limit}); retry later",
                             self.settings.retry_after_s)
        self.in_flight += films
        metrics().in_flight.inc(films)
        try:
            yield
        finally:
            self.in_flight -= films
            metrics().in_flight.dec(films)

    def stop_admitting(self) -> None:
        """The drain began: every later `admitted` is refused; the slots already held run to their end."""
        self.draining = True

    async def triage(self, payload: bytes, admit: bool = True, keep_source: bool = False) -> Finding:
        """One film through the flow.

        `admit=False`: the caller holds the film's slot already (an HTTP request admitted before its body was
        read, the intake's `triage_spooled`). `keep_source` (the intake) keeps the parsed header and the
        decoded pixels on the Finding for the SEG/SR/SC writers.
        """
        if admit:
            with self.admitted():
                return await self.triage(payload, admit=False, keep_source=keep_source)
        await self.ensure_described()
        registry = metrics()
        total = Timings()
        with total.stage("total"):
            finding = await self.flow.run(payload, self.classify, self.segment, self.in_thread, keep_source)
        finding.timings_ms.update(total.ms)
        for stage, value in finding.timings_ms.items():
            child(registry.stage_seconds, stage=stage).observe(value / 1e3)
        registry.score.observe(finding.score)
        child(registry.findings, label="positive" if finding.positive else "negative",
              priority=finding.priority.value).inc()
        count_ood(registry, finding)
        return finding

    async def triage_spooled(self, data: bytes) -> Finding:
        """The intake's triage: never refused for capacity (the intake's workers bound it), 503s waited out
        (`until_available`) -- a model out of service, or a drain, during which a film not yet started waits
        spooled for the next start; a refused film counts in ptx_rejections_total as over HTTP."""
        async def once() -> Finding:
            with self.admitted(beyond_limit=True):
                return await self.triage(data, admit=False, keep_source=True)

        try:
            return await until_available(once, self.settings.retry_after_s)
        except RadiographError as exc:
            count_rejection(exc.code_text)
            raise
