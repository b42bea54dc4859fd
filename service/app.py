"""The BentoML services only: the HTTP edge (`Triage`) in front of a batching model worker (`Models`).

    client ─HTTP→ Triage: routes (service/http) → ServedCascade (service/cascade) ─→ Models.classify (batched)
    PACS ─C-STORE→ Pacs (service/pacs, started here) ─→ the same ServedCascade ─→ Models.segment (gated)

Two services: BentoML batches a method only for calls through its server. One worker for both models: on a CPU
each wants every core, and one batch at a time beats two workers fighting (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging

import bentoml
import numpy as np
from bentoml._internal.context import server_context

from service.cascade.flow import Flow
from service.cascade.served import ServedCascade
from service.http import auth, deidentify, drain, exposure, middleware
from service.http.pages import pages, viewer
from service.http.routes import http
from service.imaging.decode_pool import shared_pool
from service.imaging.decoding import decode_here
from service.metrics import metrics, start_resource_sampler
from service.models import batching
from service.models.local_models import LocalModels
from service.models.manifest import ManifestError
from service.models.model_set import ModelSet, resolve
from service.models.runner import ModelRunner, observed_by
from service.models.worker_client import ModelClient
from service.pacs import notify, remote_triage
from service.pacs.side import Pacs
from service.settings import load_settings
from service.store import open_store
from service.store.results_files import ResultsFolder

log = logging.getLogger("ptx.app")
logging.getLogger("ptx").setLevel(logging.INFO)  # ours at INFO through BentoML's handlers (it leaves root at WARNING)

SETTINGS = load_settings()  # once per process; BentoML imports this module in every worker
# Checked at import, before any worker: a bad model, token, address or setting stops `bentoml serve` in one line.
try:
    MODEL_SET: ModelSet = resolve(SETTINGS)
    AUTH = auth.from_settings(SETTINGS)  # None: no token configured, authentication off (service/http/auth.py)
    exposure.guard(SETTINGS, AUTH)  # not loopback and no token: refused unless PTX_ALLOW_ANONYMOUS
    viewer.check_template(SETTINGS.viewer_url)  # PTX_VIEWER_URL: {study_uid} in an http(s) URL (http/pages/viewer.py)
    notify.check_settings(SETTINGS)  # PTX_NOTIFY_*: e.g. a webhook without its secret (service/pacs/notify)
    remote_triage.check_settings(SETTINGS)  # PTX_TRIAGE_URL: http(s)://host[:port] (service/pacs/remote_triage.py)
except (ManifestError, auth.TokenError, exposure.ExposureError, viewer.ViewerUrlError,
        notify.NotifySettingsError, remote_triage.TriageUrlError) as exc:  # each names its setting, never a token
    raise SystemExit(f"ptx-triage cannot start: {exc}") from None
DRAIN = drain.Drain.under_bentoml(SETTINGS.drain_timeout_s, SETTINGS.retry_after_s)  # this edge worker's SIGTERM drain
BATCHING = batching.api_options(SETTINGS)  # greedy dispatch where PTX_GREEDY_BATCHING (service/models/batching.py)


@bentoml.service(name="ptx-models", workers=1, threads=1, traffic={"timeout": 300},
                 logging={"access": {"enabled": False}})  # each film's internal calls are logged once, at the edge
class Models:
    """Both models in one process, one batch at a time; each model batched adaptively by BentoML."""

    def __init__(self) -> None:
        self.runner = ModelRunner.for_worker(MODEL_SET, SETTINGS)
        self.observe = observed_by(metrics())
        drain.outlast_edge(SETTINGS.drain_timeout_s + 15)  # SIGTERM: serve the edge's drain and its shutdown

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


# metrics off: BentoML's per-path request series are unbounded; ours go by route template (http/request_metrics.py)
@bentoml.service(name="ptx-triage", workers=SETTINGS.edge_workers, traffic={"timeout": 300}, metrics={"enabled": False})
@bentoml.asgi_app(http, path="/v1")
@bentoml.asgi_app(pages, path="/worklist")  # the reading room's pages (service/http/pages)
class Triage:
    """The HTTP edge (routes in service/http), ready once the model worker is; auth: docs/security.md."""

    if not SETTINGS.models_in_edge:  # else no worker: the models run here (service/models/local_models.py)
        models = bentoml.depends(Models)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.client = LocalModels.start(MODEL_SET, SETTINGS) if SETTINGS.models_in_edge else ModelClient(
            self.models, MODEL_SET.segmenter_spec.size, SETTINGS.max_latency_ms, SETTINGS.retry_after_s)
        self.cascade = ServedCascade(Flow.from_settings(SETTINGS, MODEL_SET), SETTINGS, self.client.classify,
                                     self.client.segment, describe=self.client.backends)
        if SETTINGS.decode_timeout_s:  # decode workers up before the first compressed film
            shared_pool(SETTINGS.decode_timeout_s, SETTINGS.decode_memory_mb, SETTINGS.decode_threads,
                        decode_here).prestart()
        self.store = open_store(SETTINGS.database_url, SETTINGS.data_dir)  # migrates; SQLite by default
        self.results = ResultsFolder.from_settings(SETTINGS, self.store)
        self.in_thread = self.cascade.in_thread  # the worklist API's CPU and store work, same bound
        self.private = deidentify.answer_filter(deidentify.from_settings(SETTINGS))  # what answers carry of UIDs
        DRAIN.install(lambda: self.cascade.in_flight, self.cascade.stop_admitting)  # SIGTERM: drain first
        self.pacs: Pacs | None = None
        self._pacs_task: asyncio.Task[None] | None = None
        self.notifier = notify.Notifier.observed(SETTINGS, self.store, self.results) if SETTINGS.record_http else None
        start_resource_sampler("edge")

    @bentoml.on_startup
    async def _start_pacs(self) -> None:
        """With PTX_DICOM_PORT, edge worker 1 runs the PACS side (one intake per spool) once the models are ready."""
        if self.notifier is not None:
            self.notifier.start()
        if SETTINGS.dicom_port is not None and (server_context.worker_index or 1) == 1:
            self._pacs_task = asyncio.get_running_loop().create_task(self._run_pacs())

    async def _run_pacs(self) -> None:
        while not await self.__is_ready__():
            await asyncio.sleep(0.5)
        self.pacs = Pacs.observed(SETTINGS, self.store, self.results, self.cascade.triage_spooled)
        await self.pacs.start()

    @bentoml.on_shutdown
    async def _stop_pacs(self) -> None:
        if self._pacs_task is not None and not self._pacs_task.done():
            self._pacs_task.cancel()
        if self.pacs is not None:
            await self.pacs.stop(SETTINGS.drain_timeout_s)  # films being triaged finish (SIGTERM drain)
        if self.notifier is not None:
            await asyncio.to_thread(self.notifier.close)
        self.store.close()

    async def __is_ready__(self) -> bool:
        try:
            return await self.client.ready() and await self.cascade.ensure_described()
        except Exception:  # a worker that cannot answer is simply not ready
            log.warning("model worker not ready", exc_info=True)
            return False


middleware.install(Triage, SETTINGS.max_file_bytes, DRAIN, AUTH)  # metrics, lingering, drain, auth, /metrics
