"""The served cascade: admission control, the flow with the model worker's calls, and the per-film metrics.

One object per edge worker; the HTTP routes and the DICOM intake both triage through `triage`, so films
from the PACS join the same adaptive batches as HTTP uploads. CPU steps run in threads, at most
`decode_threads` at once (never on the event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from service.cascade.finding import Finding
from service.cascade.flow import Flow, ModelCall, Timings
from service.errors import ServiceError
from service.imaging.radiograph import RadiographError
from service.metrics import child, metrics
from service.models.worker_client import overloaded
from service.settings import Settings

log = logging.getLogger("ptx.cascade")


def count_rejection(code: str) -> None:
    child(metrics().rejections, code=code).inc()


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
        self.in_flight = 0

    async def in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """CPU work off the event loop, at most `decode_threads` at once."""
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def ensure_described(self) -> None:
        """Learn once which engine runs each model (the model worker knows; answers name it)."""
        if self.describe is not None:
            self.flow = self.flow.with_backends(await self.describe())
            self.describe = None

    async def triage(self, payload: bytes, admit: bool = True, keep_source: bool = False) -> Finding:
        """One film through the flow.

        `admit=False` (the DICOM intake) skips admission control: the intake's own workers bound it, and a
        spooled film must wait its turn rather than spend a retry on a 503. `keep_source` (the intake too)
        keeps the parsed header and the decoded pixels on the Finding for the SEG/SR/SC writers.
        """
        if admit and self.in_flight >= self.settings.max_in_flight:
            raise overloaded(f"{self.in_flight} films in progress (PTX_MAX_IN_FLIGHT={self.settings.max_in_flight}); "
                             "retry later", self.settings.retry_after_s)
        await self.ensure_described()
        registry = metrics()
        self.in_flight += 1
        registry.in_flight.inc()
        total = Timings()
        try:
            with total.stage("total"):
                finding = await self.flow.run(payload, self.classify, self.segment, self.in_thread, keep_source)
        finally:
            self.in_flight -= 1
            registry.in_flight.dec()
        finding.timings_ms.update(total.ms)
        for stage, value in finding.timings_ms.items():
            child(registry.stage_seconds, stage=stage).observe(value / 1e3)
        registry.score.observe(finding.score)
        child(registry.findings, label="positive" if finding.positive else "negative",
              priority=finding.priority.value).inc()
        return finding

    async def triage_spooled(self, data: bytes) -> Finding:
        """The intake's triage: no admission control, 503s waited out (`until_available`); a refused film
        counts in ptx_rejections_total as over HTTP."""
        try:
            return await until_available(lambda: self.triage(data, admit=False, keep_source=True),
                                         self.settings.retry_after_s)
        except RadiographError as exc:
            count_rejection(exc.code_text)
            raise
