"""The BentoML services only: the HTTP edge (`Triage`) in front of a batching model worker (`Models`).

    client ─HTTP→ Triage: routes (service/http) → ServedCascade (service/cascade) ─→ Models.classify (batched)
    PACS ─C-STORE→ Pacs (service/pacs, started here) ─→ the same ServedCascade ─→ Models.segment (gated, batched)

Why two services: BentoML batches a method only when the call arrives through its server, and a dependency
is called with pickle. Why one worker for both models: on a CPU both want every core; one batch at a time beats
two workers fighting; each model keeps its batcher. docs/architecture.md tells the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import bentoml
import numpy as np

from service.cascade.flow import Flow
from service.cascade.served import ServedCascade
from service.http import auth, deidentify
from service.http.pages import pages
from service.http.request_metrics import RequestMetrics
from service.http.routes import http
from service.imaging.decode_pool import shared_pool
from service.imaging.decoding import decode_here
from service.metrics import metrics, start_resource_sampler
from service.models import batching
from service.models.manifest import ManifestError
from service.models.model_set import ModelSet, resolve
from service.models.runner import ModelRunner, observed_by
from service.models.worker_client import ModelClient
from service.settings import load_settings
from service.store import open_store
from service.store.results_files import ResultsFolder

log = logging.getLogger("ptx.app")
logging.getLogger("ptx").setLevel(logging.INFO)  # ours at INFO through BentoML's handlers (it leaves root at WARNING)

SETTINGS = load_settings()  # once per process; BentoML imports this module in every worker
# Models hash-verified at import: `bentoml serve` imports this module before any worker, so a missing or
# tampered model (or a bad token file) stops the command with one line instead of workers respawning.
try:
    MODEL_SET: ModelSet = resolve(SETTINGS)
    AUTH = auth.from_settings(SETTINGS)  # None: no token configured, authentication off (service/http/auth.py)
except (ManifestError, auth.TokenError) as exc:  # the messages name the file / setting, never a token
    raise SystemExit(f"ptx-triage cannot start: {exc}") from None
DEIDENTIFY = deidentify.from_settings(SETTINGS)  # None: answers carry the DICOM UIDs
BATCHING = batching.api_options(SETTINGS)  # greedy dispatch where PTX_GREEDY_BATCHING (service/models/batching.py)


@bentoml.service(name="ptx-models", workers=1, threads=1, traffic={"timeout": 300},
                 logging={"access": {"enabled": False}})  # each film's internal calls are logged once, at the edge
class Models:
    """Both models in one process, one batch at a time; each model batched adaptively by BentoML."""

    def __init__(self) -> None:
        self.runner = ModelRunner.for_worker(MODEL_SET, SETTINGS)
        self.observe = observed_by(metrics())

    @bentoml.api(**BATCHING)
    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Packed triage scores (see `service.models.runner.pack`) for preprocessed classifier inputs."""
        return self.observe("classifier", batch, self.runner.classify(batch))

    @bentoml.api(**BATCHING)
    def segment(self, batch: np.ndarray) -> np.ndarray:
        """Packed probability maps for preprocessed segmenter inputs (gated films only)."""
        return self.observe("segmenter", batch, self.runner.segment(batch))

    def __is_ready__(self) -> bool:
        """Unready while a model is out of service after a failed run (service/models/health.py)."""
        return self.runner.health.ready()

    @bentoml.api
    def backends(self) -> dict[str, str]:
        """Which engine runs each model (e.g. onnxruntime-cpu, torch-cuda-fp16)."""
        return {"classifier": self.runner.classifier.name, "segmenter": self.runner.segmenter.name}


@bentoml.service(name="ptx-triage", workers=SETTINGS.edge_workers, traffic={"timeout": 300})
@bentoml.asgi_app(http, path="/v1")
@bentoml.asgi_app(pages, path="/worklist")  # the reading room's pages (service/http/pages)
class Triage:
    """The HTTP edge (routes in service/http), ready once the model worker is. Bearer authentication wraps
    everything it serves when PTX_API_TOKEN is set (service/http/auth.py; docs/security.md)."""

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.client = ModelClient(self.models, MODEL_SET.segmenter_spec.size, SETTINGS.max_latency_ms,
                                  SETTINGS.retry_after_s)
        self.cascade = ServedCascade(Flow.from_settings(SETTINGS, MODEL_SET), SETTINGS, self.client.classify,
                                     self.client.segment, describe=self.client.backends)
        if SETTINGS.decode_timeout_s:  # decode workers up before the first compressed film
            shared_pool(SETTINGS.decode_timeout_s, SETTINGS.decode_memory_mb, SETTINGS.decode_threads,
                        decode_here).prestart()
        self.store = open_store(SETTINGS.database_url, SETTINGS.data_dir)  # migrates; SQLite by default
        self.results = ResultsFolder(SETTINGS.data_dir / "results")
        self.in_thread = self.cascade.in_thread  # the worklist API's CPU and store work, same bound
        self.private = deidentify.answer_filter(DEIDENTIFY)  # what answers carry of the UIDs
        self.pacs: Any = None
        self._pacs_task: asyncio.Task[None] | None = None
        metrics()  # the metric families exist before the first request
        start_resource_sampler("edge")

    @bentoml.on_startup
    async def _start_pacs(self) -> None:
        """With PTX_DICOM_PORT set, the first edge worker runs the PACS side (one intake per spool), once the
        model worker is ready: C-STOREs are only acknowledged by a service that can triage them."""
        from bentoml._internal.context import server_context

        if SETTINGS.dicom_port is not None and (server_context.worker_index or 1) == 1:
            self._pacs_task = asyncio.get_running_loop().create_task(self._run_pacs())

    async def _run_pacs(self) -> None:
        from service.pacs.side import Pacs

        while not await self.__is_ready__():
            await asyncio.sleep(0.5)
        self.pacs = Pacs.observed(SETTINGS, self.store, self.results, self.cascade.triage_spooled)
        await self.pacs.start()

    @bentoml.on_shutdown
    async def _stop_pacs(self) -> None:
        if self._pacs_task is not None and not self._pacs_task.done():
            self._pacs_task.cancel()
        if self.pacs is not None:
            await self.pacs.stop()
        self.store.close()

    async def __is_ready__(self) -> bool:
        try:
            if not await self.models.is_ready(timeout=5):
                return False
            await self.cascade.ensure_described()
            return True
        except Exception:  # noqa: BLE001 -- a worker that cannot answer is simply not ready
            log.warning("model worker not ready", exc_info=True)
            return False


# Around all the edge serves (BentoML's /metrics, health too); not the worker: only the edge reaches it, locally.
Triage.add_asgi_middleware(auth.BearerAuth, config=AUTH)
Triage.add_asgi_middleware(RequestMetrics)  # outermost: counts refusals by auth too, by route template only
if AUTH is not None:
    log.info("bearer authentication on: %r", AUTH)
