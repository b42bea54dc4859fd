"""The edge's calls to the model worker: one film per call, which BentoML's adaptive batching joins.

Errors become `ServiceError`s the caller can answer: a full batch queue → 503 `overloaded`, a failed or
unreachable model → 503 `model_unavailable` (with Retry-After: a retry later, or on another replica, can
succeed). A connection closed under a call is retried (calls are idempotent). The queue wait of each call
(its time minus the batch's run time, which the worker packs into each row) is a metric.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from service.errors import ServiceError, unavailable
from service.metrics import child, metrics
from service.models.runner import CLASSIFY_ROW, unpack

log = logging.getLogger("ptx.models")

RECONNECT_ATTEMPTS = 3


def overloaded(message: str, retry_after_s: int) -> ServiceError:
    """503 `overloaded` with Retry-After, counted: admission control and a full batch queue say it."""
    metrics().overloaded.inc()
    return unavailable("overloaded", message, retry_after_s)


async def with_reconnect(call: Any, batch: np.ndarray) -> Any:
    """Call the model worker, retrying a call whose connection was closed under it (calls are idempotent).

    See `ModelClient.keep_session`: the retry covers a worker restart; the session swap is switched off there.
    """
    for attempt in range(RECONNECT_ATTEMPTS):
        try:
            return await call(batch)
        except aiohttp.ClientConnectionError:
            if attempt == RECONNECT_ATTEMPTS - 1:
                raise
            log.info("model worker connection closed in flight; retrying (attempt %d)", attempt + 2)
    raise AssertionError("unreachable")


class ModelClient:
    """Async `classify` / `segment` for one film each, through the BentoML dependency on the model worker."""

    def __init__(self, worker: Any, segmenter_side: int, max_latency_ms: int, retry_after_s: int) -> None:
        self.worker, self.side = worker, segmenter_side
        self.max_latency_ms, self.retry_after_s = max_latency_ms, retry_after_s

    async def classify(self, batch: np.ndarray) -> np.ndarray:
        """[[score, OOD distance]] for one film (runner.CLASSIFY_ROW; the distance -1 where there is none)."""
        return await self._call("classifier", batch, CLASSIFY_ROW)

    async def segment(self, batch: np.ndarray) -> np.ndarray:
        return await self._call("segmenter", batch, (self.side, self.side))

    async def ready(self) -> bool:
        """Whether the model worker says it is ready (it is not while a model is out of service)."""
        return bool(await self.worker.is_ready(timeout=5))

    async def backends(self) -> dict[str, str]:
        """Which engine runs each model, from the worker; 503 `model_unavailable` while it cannot say."""
        self.keep_session()
        try:
            return dict(await self.worker.to_async.backends())
        except Exception as exc:  # noqa: BLE001 -- any failure here means the worker cannot serve yet
            raise unavailable("model_unavailable", "the model worker is not available; retry later",
                              self.retry_after_s) from exc

    def keep_session(self) -> None:
        """Work around BentoML 1.4.39: its dependency client replaces its HTTP session every 100 requests or
        300 s and closes the old one with calls still in flight on it, failing them ("Server disconnected",
        "Connection closed": 26 of 120 requests at 16 concurrent). On a local socket to our own worker there
        is nothing to refresh, so the limits are lifted. Guarded: a BentoML without the attribute is untouched.
        """
        manager = getattr(self.worker.to_async, "_session_manager", None)
        if manager is not None and hasattr(manager, "max_requests"):
            manager.max_requests = 2**62
            manager.max_age = float("inf")

    async def _call(self, role: str, batch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One film through a batched model call; records its queue wait."""
        call = self.worker.to_async.classify if role == "classifier" else self.worker.to_async.segment
        started = time.perf_counter()
        try:
            packed = await with_reconnect(call, batch)
        except BentoMLException as exc:
            if exc.error_code == 503:  # BentoML's batcher: the queue cannot meet max_latency_ms
                raise overloaded(f"the {role} queue is full (PTX_MAX_LATENCY_MS={self.max_latency_ms}); retry later",
                                 self.retry_after_s) from None
            # A failed model (`ModelUnavailable`, out of service until its probe passes: BentoML answers it as
            # a 500) or any other worker failure: no result rather than a wrong one.
            log.error("%s call failed: %s", role, exc)
            raise unavailable("model_unavailable", f"the {role} is out of service; the film was not triaged; "
                              "retry later", self.retry_after_s) from None
        except aiohttp.ClientConnectionError as exc:
            log.error("%s unreachable: %s", role, exc)
            raise unavailable("model_unavailable", f"the {role} worker is unreachable; retry later",
                              self.retry_after_s) from None
        elapsed = time.perf_counter() - started
        unpacked = unpack(packed, shape)
        child(metrics().queue_wait_seconds, model=role).observe(max(0.0, elapsed - float(unpacked.seconds[0])))
        return unpacked.outputs
