"""Both models inside the HTTP edge's own process (`PTX_MODELS_IN_EDGE`): no second process, no hop.

Why: by default the edge hands every film to a separate BentoML model worker (service/app.py `Models`), so
that several edge processes share one copy of the models and one batch runs at a time. On a small CPU box
with one edge process that hop is pure cost: each film's model input (1 MB at 512²) is serialised, sent over
a local socket and parsed by a second Python server, and the two processes' threads compete for the same
cores (docs/benchmarks.md, "the small-CPU profile"). Here the edge calls a `ModelRunner` in-process.

Batching stays: `GreedyBatcher` is the work-conserving policy the worker's BentoML batching is patched to
(service/models/batching.py): a film's call runs at once when its model is idle, and every call that queued
while the model was busy runs as the next batch (up to `max_batch_size`). Written here, not taken from
BentoML, because BentoML batches only calls that go through its server. PTX_MODEL_INSTANCES threads run the
batches of both models (the runner's lock allows as many runs at once; one by default: on a CPU each model wants
every core).

The interface is `ModelClient`'s (service/models/worker_client.py), with the same errors and metrics: a failed
model is 503 `model_unavailable`, the queue wait of each call is observed. Admission control
(`PTX_MAX_IN_FLIGHT`) bounds the queue, so no latency bound of its own is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import unavailable
from service.metrics import child, metrics
from service.models.model_set import ModelSet
from service.models.runner import CLASSIFY_ROW, ModelRunner, observed_by, unpack
from service.settings import Settings

log = logging.getLogger("ptx.models")


@dataclass
class _Call:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    started: float = field(default_factory=time.perf_counter)


class GreedyBatcher:
    """One model's calls joined into batches: dispatch whenever the model is free, with all that waited.

    `run` takes a (N, C, S, S) batch and returns packed rows (`service.models.runner.pack`); it runs on
    `executor`. Each caller gets its own rows of the output back, unpacked to `shape` per film.
    """

    def __init__(self, role: str, run: Callable[[np.ndarray], np.ndarray], executor: ThreadPoolExecutor,
                 max_batch_size: int, shape: tuple[int, ...], retry_after_s: int, instances: int = 1) -> None:
        self.role, self.run, self.executor = role, run, executor
        self.max_batch_size, self.shape, self.retry_after_s = max_batch_size, shape, retry_after_s
        self.instances = instances  # batches of this model that may run at once (PTX_MODEL_INSTANCES)
        self.pending: list[_Call] = []
        self.running = 0
        self.wait = child(metrics().queue_wait_seconds, model=role)

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        call = _Call(rows, asyncio.get_running_loop().create_future())
        self.pending.append(call)
        if self.running < self.instances:
            self._dispatch()
        return await call.future

    def _dispatch(self) -> None:
        """Start the next batch: the queued calls in arrival order, whole, up to max_batch_size rows."""
        taken, rows = [], 0
        while self.pending and (not taken or rows + len(self.pending[0].rows) <= self.max_batch_size):
            call = self.pending.pop(0)
            taken.append(call)
            rows += len(call.rows)
        self.running += 1
        batch = taken[0].rows if len(taken) == 1 else np.concatenate([call.rows for call in taken])
        job = asyncio.get_running_loop().run_in_executor(self.executor, self.run, batch)
        job.add_done_callback(lambda done: self._finish(taken, done))

    def _finish(self, taken: list[_Call], done: asyncio.Future[np.ndarray]) -> None:
        self.running -= 1
        try:
            unpacked = unpack(done.result(), self.shape)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001
            # a failed run, or one cancelled at shutdown: no result rather than a wrong one, no caller left waiting
            log.error("%s batch of %d film(s) failed: %s", self.role, len(taken), exc)
            for call in taken:
                if not call.future.done():
                    call.future.set_exception(unavailable(
                        "model_unavailable", f"the {self.role} is out of service; the film was not triaged; "
                        "retry later", self.retry_after_s))
        else:
            now, start = time.perf_counter(), 0
            for call in taken:
                stop = start + len(call.rows)
                self.wait.observe(max(0.0, now - call.started - float(unpacked.seconds[start])))
                if not call.future.done():  # a caller that gave up (cancelled) is skipped
                    call.future.set_result(unpacked.outputs[start:stop])
                start = stop
        if self.pending and self.running < self.instances:
            self._dispatch()


class LocalModels:
    """`ModelClient`'s interface over a `ModelRunner` in this process (`PTX_MODELS_IN_EDGE`)."""

    def __init__(self, runner: ModelRunner, settings: Settings) -> None:
        self.runner = runner
        instances = settings.model_instances
        self.executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="ptx-models")
        observe = observed_by(metrics())
        side = runner.models.segmenter_spec.size

        def step(role: str, run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
            return lambda batch: observe(role, batch, run(batch))

        self.classify = GreedyBatcher("classifier", step("classifier", runner.classify), self.executor,
                                      settings.max_batch_size, CLASSIFY_ROW, settings.retry_after_s, instances)
        self.segment = GreedyBatcher("segmenter", step("segmenter", runner.segment), self.executor,
                                     settings.max_batch_size, (side, side), settings.retry_after_s, instances)

    @classmethod
    def start(cls, models: ModelSet, settings: Settings) -> LocalModels:
        """Load (and with PTX_WARMUP warm) both models here, with the worker's metrics and health."""
        log.info("models in the edge process (PTX_MODELS_IN_EDGE): no separate model worker")
        return cls(ModelRunner.for_worker(models, settings), settings)

    async def backends(self) -> dict[str, str]:
        return {"classifier": self.runner.classifier.name, "segmenter": self.runner.segmenter.name}

    async def ready(self) -> bool:
        """Unready while a model is out of service after a failed run (service/models/health.py)."""
        return self.runner.health.ready()
