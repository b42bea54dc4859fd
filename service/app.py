"""The BentoML service: an HTTP edge (`Triage`) in front of a model worker (`Models`) that batches.

    client ─HTTP→ Triage (decode + preprocess in threads) ─→ Models.classify  (adaptive batch)
                         gate: score ≥ manifest gate      ─→ Models.segment   (adaptive batch, gated only)
                         conclude in threads (mask at film size, instances, RLE, priority) ─→ JSON

Why two services and not one with two batchable methods: BentoML batches a method only when the call
arrives through its server; a service calling its own method goes through an in-process JSON round trip
(a 256² float map as a JSON list costs more than the model), whereas a dependency is called with pickle.
Why one model worker holding both models and not one per model: on a CPU box both models want every core,
so a single worker running one batch at a time with all intra-op threads beats two workers fighting over
the same cores; on a GPU the two models share one device anyway. Each model still has its own batcher.
The edge keeps the GIL-heavy, per-film work (DICOM parsing, PNG/RLE) away from the batch dispatcher.

Errors are JSON `{"error": {"code", "message"}}`: 400 not DICOM / bad parameter, 413 too large, 415 media
type, 422 rejected radiograph (the imaging code), 503 overloaded or model out of service (with Retry-After), 500 a bug;
401 without the bearer token when one is configured (service/auth.py, around BentoML's endpoints too).
BentoML serves /healthz, /livez, /readyz (ready once the models are loaded and warmed) and /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Query
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from service.http import auth, deidentify
from service.models import batching
from service.http.schemas import BATCH_BODY, DICOM_BODY, ERRORS, BatchOut, TriageOut, error
from service.http.worklist import router as worklist_router
from service.imaging.decode_pool import shared_pool
from service.cascade.finding import Finding
from service.imaging.reader import read_radiograph
from service.log_safety import describe_exception
from service.models.manifest import ManifestError
from service.metrics import child, metrics, start_resource_sampler
from service.models.model_set import ModelSet, resolve
from service.imaging.radiograph import RadiographError
from service.store.results_files import ResultsFolder
from service.models.runner import ModelRunner, unpack
from service.settings import load_settings
from service.store import FindingRecord, ReceivedInstance, open_store, utc_now
from service.cascade.flow import Edge, Prepared

log = logging.getLogger("ptx.app")
# BentoML configures its own loggers and leaves the root at WARNING; ours report model loading, providers and
# warm-up at INFO through BentoML's handlers (same format, same destination).
logging.getLogger("ptx").setLevel(logging.INFO)

SETTINGS = load_settings()  # read once per process; BentoML imports this module in every worker
# Which models, every file hash-verified against its manifest, at import: `bentoml serve` imports this module
# before it starts any worker, so a missing, ambiguous or tampered model stops the command with its message
# (instead of BentoML respawning workers that fail the same way every 10 s).
try:
    MODEL_SET: ModelSet = resolve(SETTINGS)
    AUTH = auth.from_settings(SETTINGS)  # None: no token configured, authentication off (service/auth.py)
except (ManifestError, auth.TokenError) as exc:  # the messages name the file / setting, never a token
    raise SystemExit(f"ptx-triage cannot start: {exc}") from None
DEIDENTIFY = deidentify.from_settings(SETTINGS)  # None: answers carry the DICOM UIDs
if SETTINGS.greedy_batching:
    batching.install()  # before BentoML builds the model worker's batchers (service/batching.py says why)
BODY_TYPES = ("application/dicom", "application/octet-stream", "image/png")
MASK_FORMATS = ("png", "rle", "none")


class ApiError(Exception):
    """An answer other than 200, with its stable code; raised anywhere in a request, answered in one place."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> JSONResponse:
        return error(self.code, self.message, self.status, self.headers)


def overloaded(message: str) -> ApiError:
    metrics().overloaded.inc()
    return ApiError(503, "overloaded", message, {"Retry-After": str(SETTINGS.retry_after_s)})


# --------------------------------------------------------------------------------------------------------------
# The model worker


@bentoml.service(name="ptx-models", workers=1, threads=1, traffic={"timeout": 300},
                 logging={"access": {"enabled": False}})
class Models:
    """Both models in one process, one batch at a time; each model batched adaptively by BentoML.

    No access log here: every film makes one or two internal calls, already logged once at the edge.
    """

    def __init__(self) -> None:
        self._report_resources()  # first: memory is worth watching while the models load, too
        self.models = MODEL_SET
        registry = metrics()
        self.runner = ModelRunner(self.models, SETTINGS, on_health_change=lambda role, ready: registry.ready.labels(
            role=role).set(1 if ready else 0))
        if SETTINGS.warmup:
            self.runner.warmup((1, SETTINGS.max_batch_size))
        for entry, backend in zip(self.models.entries(), (self.runner.classifier, self.runner.segmenter)):
            registry.model_info.labels(role=entry.role, name=entry.manifest.name, version=entry.manifest.version,
                                       backend=backend.name, provider=getattr(backend, "provider", "unknown")).set(1)
            registry.ready.labels(role=entry.role).set(1)
        self._children = {role: (registry.batch_size.labels(model=role), registry.model_batch_seconds.labels(model=role))
                          for role in ("classifier", "segmenter")}

    @staticmethod
    def _report_resources() -> None:
        """GPU visibility (with provider=cpu in ptx_model_info: a GPU box running on the CPU), and the sampler of
        this process's memory and the GPU's."""
        from service.models.backends.onnxruntime import probe_gpu# here: the edge never loads onnxruntime

        metrics().gpu_visible.set(1 if probe_gpu() is not None else 0)
        start_resource_sampler("models", gpu=True)

    def _observe(self, model: str, batch: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """Batch size and run time, per batch (children cached: `labels()` costs more than `observe()`)."""
        sizes, seconds = self._children[model]
        sizes.observe(len(batch))
        seconds.observe(float(packed[0, -2]) if len(packed) else 0.0)
        return packed

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Packed triage scores (see `service.models.runner.pack`) for preprocessed classifier inputs."""
        return self._observe("classifier", batch, self.runner.classify(batch))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def segment(self, batch: np.ndarray) -> np.ndarray:
        """Packed probability maps for preprocessed segmenter inputs (gated films only)."""
        return self._observe("segmenter", batch, self.runner.segment(batch))

    def __is_ready__(self) -> bool:
        """Unready while a model is out of service after a failed run (see service/model_health.py); the
        edge's /readyz follows, so an orchestrator stops routing here until a probe brings the model back."""
        return self.runner.health.ready()

    @bentoml.api
    def backends(self) -> dict[str, str]:
        """Which engine runs each model (e.g. onnxruntime-cpu, torch-cuda-fp16)."""
        return {"classifier": self.runner.classifier.name, "segmenter": self.runner.segmenter.name}


# --------------------------------------------------------------------------------------------------------------
# The HTTP edge

http = FastAPI(title="ptx-triage", version="1", description=__doc__.split("\n\n")[0])
http.include_router(worklist_router)

RECONNECT_ATTEMPTS = 3


async def _with_reconnect(call: Any, batch: np.ndarray) -> Any:
    """Call the model worker, retrying a call whose connection was closed under it (calls are idempotent).

    See `_keep_session`: the retry covers a worker restart; the session swap is switched off there.
    """
    for attempt in range(RECONNECT_ATTEMPTS):
        try:
            return await call(batch)
        except aiohttp.ClientConnectionError:
            if attempt == RECONNECT_ATTEMPTS - 1:
                raise
            log.info("model worker connection closed in flight; retrying (attempt %d)", attempt + 2)
    raise AssertionError("unreachable")


async def until_available(call: Any, pause_s: float) -> Any:
    """`await call()`, again every `pause_s` while it raises a 503 (a model out of service, a full batch queue).

    For the DICOM intake: an acknowledged film waits in the spool for the model to come back, without
    spending one of its attempts -- it must not be failed (and dropped from the spool) for an outage.
    """
    warned = False
    while True:
        try:
            return await call()
        except ApiError as exc:
            if exc.status != 503:
                raise
            if not warned:
                log.warning("intake waiting for the service (%s); the film stays spooled", exc.code)
                warned = True
            await asyncio.sleep(pause_s)


def _service() -> Triage:
    return bentoml.get_current_service()  # type: ignore[no-any-return]


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it exceeds the limit (declared or streamed)."""
    limit = SETTINGS.max_file_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                         "(PTX_MAX_FILE_BYTES)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"request body exceeds the limit of {limit} bytes (PTX_MAX_FILE_BYTES)")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-body: its fault, not an internal error (found by fuzzing)
        raise ApiError(400, "incomplete_body", f"the client closed the connection after {size} bytes of the body "
                                               f"({declared or 'unknown'} declared)") from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 -- lets Starlette's form parser reuse the bytes already read
    return body


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _payloads(request: Request, many: bool) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each uploaded file: a raw body, or multipart `file` field(s)."""
    media_type = _media_type(request)
    if media_type in BODY_TYPES and not many:
        return [(None, await _read_body(request))]
    if media_type != "multipart/form-data":
        accepted = "multipart/form-data" if many else f"{', '.join(BODY_TYPES)} or multipart/form-data"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {media_type or 'absent'!r}; send {accepted}")
    await _read_body(request)
    limit = SETTINGS.max_files_per_request if many else 1
    try:
        form = await request.form(max_files=limit, max_fields=limit + 8)
    except Exception as exc:  # Starlette raises its own HTTPException / MultiPartException for both cases
        raise ApiError(400, "invalid_multipart", f"multipart body could not be parsed ({getattr(exc, 'detail', exc)}); "
                                                 f"at most {limit} file(s) per request") from None
    uploads = [item for item in form.getlist("file") if not isinstance(item, str)]
    if not uploads:
        raise ApiError(400, "missing_file", "multipart body needs a file field named 'file'")
    return [(upload.filename, await upload.read()) for upload in uploads]


def _mask_format(value: str | None) -> str:
    value = SETTINGS.mask_default if value is None else value
    if value not in MASK_FORMATS:
        raise ApiError(400, "invalid_parameter", f"mask={value!r}; use one of {', '.join(MASK_FORMATS)}")
    return value


MASK_QUERY = Query(None, description="mask in the answer: png (base64 PNG + RLE), rle (RLE only) or none; "
                                      "default from PTX_MASK_DEFAULT (png)")


@http.post("/inspect", openapi_extra={"requestBody": DICOM_BODY}, responses=ERRORS,
           summary="Decode and validate a radiograph without triaging it")
async def inspect(request: Request) -> JSONResponse:
    """What the service makes of a file (UIDs, size, spacing, photometric, window, warnings), or its
    rejection with the code: a PACS team checks their exports with it."""
    service = _service()
    try:
        (_, payload), = await _payloads(request, many=False)
        radiograph = await service.in_thread(read_radiograph, payload, service.edge.policy)
    except ApiError as exc:
        return _refused(exc)
    except RadiographError as exc:
        return _refused(ApiError(exc.http_status, exc.code.value, exc.message))
    except Exception as exc:  # noqa: BLE001 -- as in triage: a bug answers our JSON 500, logged, never a traceback
        log.error("inspect failed: %s", describe_exception(exc, depth=12))
        return _refused(ApiError(500, "internal_error", "the file could not be inspected (internal error, logged)"))
    return JSONResponse(_private(radiograph.metadata()))


@http.post("/triage", response_model=TriageOut, openapi_extra={"requestBody": DICOM_BODY}, responses=ERRORS,
           summary="Triage one chest radiograph")
async def triage(request: Request, mask: str | None = MASK_QUERY) -> JSONResponse:
    """Body: one DICOM file (application/dicom), a PNG, or a multipart `file` field. Answer: triage score,
    label at the operating point, priority, mask, SIIM RLE, instances with boxes in px and mm, timings."""
    service = _service()
    try:
        mask_format = _mask_format(mask)
        (_, payload), = await _payloads(request, many=False)
        finding = await service.cascade.flow(payload)
        if SETTINGS.record_http:
            await service.in_thread(service.record, finding)
    except ApiError as exc:
        return _refused(exc)
    except RadiographError as exc:
        return _refused(ApiError(exc.http_status, exc.code.value, exc.message))
    except Exception as exc:  # noqa: BLE001 -- a bug must not take the service down or leak a traceback
        log.error("triage failed: %s", describe_exception(exc, depth=12))  # no message: it may quote data
        return _refused(ApiError(500, "internal_error", "the film could not be triaged (internal error, logged)"))
    return JSONResponse(_private(finding.to_json(mask_format)))


@http.post("/triage/batch", response_model=BatchOut, openapi_extra={"requestBody": BATCH_BODY}, responses=ERRORS,
           summary="Triage several radiographs in one request")
async def triage_batch(request: Request, mask: str | None = MASK_QUERY) -> JSONResponse:
    """Several films as multipart `file` fields: one result or error per file, in order. The films join the
    same adaptive batches as single requests."""
    service = _service()
    try:
        mask_format = _mask_format(mask)
        payloads = await _payloads(request, many=True)
    except ApiError as exc:
        return _refused(exc)
    outcomes = await asyncio.gather(*(service.cascade.flow(payload) for _, payload in payloads), return_exceptions=True)
    results: list[dict[str, Any]] = []
    for (filename, _), outcome in zip(payloads, outcomes):
        if isinstance(outcome, Finding):
            item = outcome.to_json(mask_format)
        elif isinstance(outcome, RadiographError):
            _count_rejection(outcome.code.value)
            item = {"error": {"code": outcome.code.value, "message": outcome.message}}
        elif isinstance(outcome, ApiError):
            _count_rejection(outcome.code)
            item = {"error": {"code": outcome.code, "message": outcome.message}}
        else:
            log.error("triage failed in a batch: %s", describe_exception(outcome, depth=12))
            _count_rejection("internal_error")
            item = {"error": {"code": "internal_error", "message": "the film could not be triaged (logged)"}}
        results.append(_private({"filename": filename, **item}))
    return JSONResponse({"results": results})


def _private(body: dict[str, Any]) -> dict[str, Any]:
    """The answer as sent: with PTX_DEIDENTIFY_RESPONSES its UIDs pseudonymised and file names dropped."""
    return body if DEIDENTIFY is None else DEIDENTIFY.answer(body)


def _count_rejection(code: str) -> None:
    child(metrics().rejections, code=code).inc()


def _refused(exc: ApiError) -> JSONResponse:
    _count_rejection(exc.code)
    return exc.response()


@bentoml.service(name="ptx-triage", workers=SETTINGS.edge_workers, traffic={"timeout": 300})
@bentoml.asgi_app(http, path="/v1")
class Triage:
    """The HTTP edge. Ready once the model worker is (models loaded and warmed).

    Authentication: set PTX_API_TOKEN (or PTX_API_TOKEN_FILE, one token per line) and every endpoint asks
    for `Authorization: Bearer <token>` (401 otherwise), except /healthz, /livez, /readyz
    (PTX_AUTH_OPEN_HEALTH=true) and the OpenAPI page with /docs.json (PTX_AUTH_OPEN_DOCS=true); /metrics is
    protected unless PTX_AUTH_OPEN_METRICS=true. TLS comes from a reverse proxy (docs/security.md). The
    OpenAPI page says the same (BentoML writes that page itself: `auth.BearerAuth` adds the text and scheme).
    """

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        # Admission control (`max_in_flight`) is per edge worker: with PTX_EDGE_WORKERS=n the box admits n times it.
        self.model_set: ModelSet = MODEL_SET
        self.edge = Edge.from_settings(SETTINGS, self.model_set)
        if self.edge.policy.decode_timeout_s is not None:  # decode workers up before the first compressed film
            shared_pool(self.edge.policy.decode_timeout_s, self.edge.policy.decode_memory_mb,
                        self.edge.policy.decode_workers).prestart()
        self.limiter = anyio.CapacityLimiter(SETTINGS.decode_threads)
        self.in_flight = 0
        self.described = False
        self.store = open_store(SETTINGS.database_url, SETTINGS.data_dir)  # migrates; SQLite by default
        self.results = ResultsFolder(SETTINGS.data_dir / "results")
        self.pacs: Any = None
        self._pacs_task: asyncio.Task[None] | None = None
        metrics()  # create the metric families now, so /metrics lists them before the first request
        start_resource_sampler("edge")

    @bentoml.on_startup
    async def _start_pacs(self) -> None:
        """With PTX_DICOM_PORT set, the first edge worker runs the PACS side (one intake per spool), once the
        model worker is ready: C-STOREs are only acknowledged by a service that can triage them."""
        from bentoml._internal.context import server_context

        if SETTINGS.dicom_port is None or (server_context.worker_index or 1) != 1:
            return
        self._pacs_task = asyncio.get_running_loop().create_task(self._run_pacs())

    async def _run_pacs(self) -> None:
        from service.pacs.side import Pacs

        while not await self.__is_ready__():
            await asyncio.sleep(0.5)
        registry = metrics()
        self.pacs = Pacs(SETTINGS, self.store, self.results, self._triage_spooled,
                         observe_notification=registry.notification_seconds.observe,
                         on_attempt=lambda destination, ok: child(
                             registry.deliveries, destination=destination, outcome="ok" if ok else "failed").inc(),
                         on_dicom_outcome=lambda outcome: child(registry.dicom_received, outcome=outcome).inc())
        await self.pacs.start()

    async def _triage_spooled(self, data: bytes) -> Finding:
        """The intake's triage: no admission control, 503s waited out (`until_available`); a refused film
        counts in ptx_rejections_total as over HTTP."""
        try:
            return await until_available(lambda: self.triage(data, admit=False, keep_display=True),
                                         SETTINGS.retry_after_s)
        except RadiographError as exc:
            _count_rejection(exc.code.value)
            raise

    @bentoml.on_shutdown
    async def _stop_pacs(self) -> None:
        if self._pacs_task is not None and not self._pacs_task.done():
            self._pacs_task.cancel()
        if self.pacs is not None:
            await self.pacs.stop()
        self.store.close()

    def record(self, finding: Finding) -> None:
        """Put an HTTP-triaged film on the worklist (PTX_RECORD_HTTP), as the PACS path does."""
        if finding.sop_uid is None or finding.study_uid is None:
            return
        now = utc_now()
        self.store.receive(ReceivedInstance(sop_uid=finding.sop_uid, study_uid=finding.study_uid,
                                            series_uid=finding.series_uid, sop_class_uid=None, source="http",
                                            spool_path=None, received_at=now))
        self.store.record_finding(FindingRecord.from_finding(finding, now))

    async def __is_ready__(self) -> bool:
        try:
            if not await self.models.is_ready(timeout=5):
                return False
            await self._describe()
            return True
        except Exception:  # noqa: BLE001 -- a worker that cannot answer is simply not ready
            log.warning("model worker not ready", exc_info=True)
            return False

    def _keep_session(self) -> None:
        """Work around BentoML 1.4.39: its dependency client replaces its HTTP session every 100 requests or
        300 s and closes the old one with calls still in flight on it, failing them ("Server disconnected",
        "Connection closed": 26 of 120 requests at 16 concurrent). On a local socket to our own worker there
        is nothing to refresh, so the limits are lifted. Guarded: a BentoML without the attribute is untouched.
        """
        manager = getattr(self.models.to_async, "_session_manager", None)
        if manager is not None and hasattr(manager, "max_requests"):
            manager.max_requests = 2**62
            manager.max_age = float("inf")

    async def _describe(self) -> None:
        """Learn once which engine runs each model (the model worker knows; answers name it)."""
        if not self.described:
            self._keep_session()
            try:
                backends = await self.models.to_async.backends()
            except Exception as exc:  # noqa: BLE001 -- any failure here means the worker cannot serve yet
                raise ApiError(503, "model_unavailable", "the model worker is not available; retry later",
                               {"Retry-After": str(SETTINGS.retry_after_s)}) from exc
            self.edge = Edge.from_settings(SETTINGS, self.model_set, backends)
            self.described = True

    async def in_thread(self, function: Any, *args: Any) -> Any:
        """CPU work off the event loop, at most `decode_threads` at once."""
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def _model(self, role: str, batch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One film through a batched model call; records its queue wait."""
        call = self.models.to_async.classify if role == "classifier" else self.models.to_async.segment
        started = time.perf_counter()
        try:
            packed = await _with_reconnect(call, batch)
        except BentoMLException as exc:
            if exc.error_code == 503:  # BentoML's batcher: the queue cannot meet max_latency_ms
                raise overloaded(f"the {role} queue is full (PTX_MAX_LATENCY_MS={SETTINGS.max_latency_ms}); "
                                 "retry later") from None
            # A failed model (`ModelUnavailable`, out of service until its probe passes: BentoML answers it as
            # a 500) or any other worker failure: no result rather than a wrong one, and a 503 because
            # retrying later (or on another replica) can succeed.
            log.error("%s call failed: %s", role, exc)
            raise ApiError(503, "model_unavailable", f"the {role} is out of service; the film was not triaged; "
                                                   "retry later", {"Retry-After": str(SETTINGS.retry_after_s)}) from None
        except aiohttp.ClientConnectionError as exc:
            log.error("%s unreachable: %s", role, exc)
            raise ApiError(503, "model_unavailable", f"the {role} worker is unreachable; retry later",
                           {"Retry-After": str(SETTINGS.retry_after_s)}) from None
        elapsed = time.perf_counter() - started
        unpacked = unpack(packed, shape)
        child(metrics().queue_wait_seconds, model=role).observe(max(0.0, elapsed - float(unpacked.seconds[0])))
        return unpacked.outputs

    async def triage(self, payload: bytes, admit: bool = True, keep_display: bool = False) -> Finding:
        """One film through the cascade; raises ApiError / RadiographError for the caller to answer.

        `admit=False` (the DICOM intake) skips admission control: the intake's own workers bound it, and a
        spooled film must wait its turn rather than spend a retry on a 503. `keep_display` (the intake too)
        keeps the decoded film on the Finding for the SC overlay, which would otherwise decode it again.
        """
        if admit and self.in_flight >= SETTINGS.max_in_flight:
            raise overloaded(f"{self.in_flight} films in progress (PTX_MAX_IN_FLIGHT={SETTINGS.max_in_flight}); "
                             "retry later")
        await self._describe()
        registry = metrics()
        self.in_flight += 1
        registry.in_flight.inc()
        started = time.perf_counter()
        try:
            prepared: Prepared = await self.in_thread(self.edge.prepare, payload)
            t0 = time.perf_counter()
            score = float((await self._model("classifier", prepared.classifier_input, ()))[0])
            prepared.timings_ms["classify"] = (time.perf_counter() - t0) * 1e3
            probability = None
            if self.edge.needs_segmenter(score):
                seg_input = prepared.segmenter_input if prepared.segmenter_input is not None \
                    else prepared.classifier_input
                side = self.model_set.segmenter_spec.size
                t0 = time.perf_counter()
                probability = (await self._model("segmenter", seg_input, (side, side)))[0]
                prepared.timings_ms["segment"] = (time.perf_counter() - t0) * 1e3
            finding: Finding = await self.in_thread(self.edge.conclude, prepared, score, probability)
            if keep_display:
                finding = dataclasses.replace(finding, display=prepared.radiograph.pixels)
        finally:
            self.in_flight -= 1
            registry.in_flight.dec()
        finding.timings_ms["total"] = (time.perf_counter() - started) * 1e3
        for stage, value in finding.timings_ms.items():
            child(registry.stage_seconds, stage=stage).observe(value / 1e3)
        registry.score.observe(finding.score)
        child(registry.findings, label="positive" if finding.positive else "negative",
              priority=finding.priority.value).inc()
        return finding


# Around everything this service serves, BentoML's /metrics and health endpoints included (with AUTH None it
# only documents how to switch authentication on); the model worker (Models) gets none: only the edge reaches
# it, over BentoML's local socket, without a token.
Triage.add_asgi_middleware(auth.BearerAuth, config=AUTH)
if AUTH is not None:
    log.info("bearer authentication on: %r", AUTH)
