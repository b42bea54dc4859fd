"""The service's own Prometheus metrics, beside BentoML's request and adaptive-batching metrics.

Why created lazily (`metrics()`), never at import: BentoML runs each service in worker processes and sets
`PROMETHEUS_MULTIPROC_DIR` only after importing the service module; prometheus_client decides at its first
import whether to write multiprocess files, and `/metrics` only shows what those files hold.

Label values are bounded sets (stage names, model roles, rejection codes, priorities): never UIDs or
anything a request can choose freely, so the number of series stays fixed whatever traffic arrives.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ptx.metrics")

# Model latency per image on a CPU is ~1-20 ms; a whole request up to seconds; queues up to max_latency_ms.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclass(frozen=True)
class Metrics:
    """Every metric the service exports, by name (`ptx_*`)."""

    stage_seconds: Any  # Histogram{stage}: per-request latency of each stage, seen from the HTTP edge
    model_batch_seconds: Any  # Histogram{model}: one batched model run (all TTA passes) in the model worker
    batch_size: Any  # Histogram{model}: films per batched model run
    queue_wait_seconds: Any  # Histogram{model}: a request's wait for its batch (round trip minus the run)
    score: Any  # Histogram: triage scores, for drift monitoring against a baseline window
    findings: Any  # Counter{label, priority}: triaged films
    rejections: Any  # Counter{code}: refused requests and films, by error code
    overloaded: Any  # Counter: requests answered 503 because the service was at capacity
    in_flight: Any  # Gauge: films being processed by the HTTP edge
    model_info: Any  # Gauge{role, name, version, backend, provider} = 1
    ready: Any  # Gauge{role}: 1 once the model worker is loaded and warmed
    notification_seconds: Any  # Histogram: C-STORE receipt → finding on the worklist
    deliveries: Any  # Counter{destination, outcome}: delivery attempts (destination names are configuration)
    spool_depth: Any  # Gauge: instances acknowledged to the PACS and not yet triaged
    delivery_states: Any  # Gauge{state}: result objects by delivery state (pending, delivered, failed)
    dicom_received: Any  # Counter{outcome}: C-STOREs answered by the listener (received, duplicate, refused, failed)
    # ... conflict: a SOP Instance UID reused with another study or other bytes, refused 0xC001 (issue 13 §3);
    # ... no_space: refused 0xA700 below the spool's free-space floor (PTX_SPOOL_MIN_FREE_MB, issue 13 §9)
    resident_memory: Any  # Gauge{role}: resident memory of the service's processes (edge, models), summed per role
    gpu_visible: Any  # Gauge: 1 when the model worker sees an NVIDIA GPU (whether or not a model runs on it)
    gpu_memory_used: Any  # Gauge{gpu}: device memory in use (all processes), where NVML answers
    gpu_memory_total: Any  # Gauge{gpu}: device memory size, where NVML answers
    http_requests: Any  # Counter{route, method, status}: HTTP requests by route TEMPLATE (never the raw path)
    http_seconds: Any  # Histogram{route, method}: HTTP request latency by route template
    outputs_pending: Any  # Gauge: findings whose SEG/SR/SC could not be written yet (retried with backoff)
    ood: Any  # Counter{flag}: films read against the classifier's OOD description (in, out); none without one
    reader_feedback: Any  # Counter{priority, verdict}: readers' verdicts on our findings (agree, disagree, uncertain)
    decode_fallbacks: Any  # Counter{reason}: reduced-resolution decodes that fell back to a full decode
    notifications: Any  # Counter{channel, outcome}: pushed notification attempts (hl7, webhook; ok, failed, given_up)
    remote_triage: Any  # Counter{outcome}: the intake's triage calls over HTTP (ok, busy, rejected, failed)


@functools.cache
def metrics() -> Metrics:
    """The process's metrics, created on first use (after BentoML has set up multiprocess collection)."""
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        stage_seconds=Histogram("ptx_stage_seconds", "Latency of one request's stage, seconds", ["stage"],
                                buckets=_LATENCY_BUCKETS),
        model_batch_seconds=Histogram("ptx_model_batch_seconds", "Duration of one batched model run, seconds",
                                      ["model"], buckets=_LATENCY_BUCKETS),
        batch_size=Histogram("ptx_batch_size", "Films per batched model run", ["model"], buckets=_BATCH_BUCKETS),
        queue_wait_seconds=Histogram("ptx_queue_wait_seconds",
                                     "Wait of one request for its model batch (round trip minus the run), seconds",
                                     ["model"], buckets=_LATENCY_BUCKETS),
        score=Histogram("ptx_triage_score", "Triage scores (classifier probability)", buckets=_SCORE_BUCKETS),
        findings=Counter("ptx_findings", "Triaged films by label and priority", ["label", "priority"]),
        rejections=Counter("ptx_rejections", "Refused requests or films by error code", ["code"]),
        overloaded=Counter("ptx_overloaded", "Requests refused with 503 because the service was at capacity"),
        in_flight=Gauge("ptx_in_flight", "Films being processed by the HTTP edge", multiprocess_mode="livesum"),
        model_info=Gauge("ptx_model_info", "Models served: name, version, backend and provider",
                         ["role", "name", "version", "backend", "provider"], multiprocess_mode="livemax"),
        ready=Gauge("ptx_model_ready", "1 once the model worker has loaded and warmed its models", ["role"],
                    multiprocess_mode="livemax"),
        notification_seconds=Histogram("ptx_time_to_notification_seconds",
                                       "From C-STORE receipt to the finding on the worklist, seconds",
                                       buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)),
        deliveries=Counter("ptx_delivery_attempts", "Attempts to send a result object, by destination and outcome",
                           ["destination", "outcome"]),
        spool_depth=Gauge("ptx_spool_depth", "Instances received over DICOM and not yet triaged",
                          multiprocess_mode="livemax"),
        delivery_states=Gauge("ptx_deliveries", "Result objects by delivery state", ["state"],
                              multiprocess_mode="livemax"),
        dicom_received=Counter("ptx_dicom_received", "C-STORE requests answered by the DICOM listener, by outcome",
                               ["outcome"]),
        # prometheus_client's process collector does not run in multiprocess mode: each process samples itself.
        resident_memory=Gauge("ptx_process_resident_memory_bytes", "Resident memory of the service's processes, "
                              "summed per role (edge, models)", ["role"], multiprocess_mode="livesum"),
        gpu_visible=Gauge("ptx_gpu_visible", "1 when the model worker sees an NVIDIA GPU, used or not",
                          multiprocess_mode="livemax"),
        gpu_memory_used=Gauge("ptx_gpu_memory_used_bytes", "GPU memory in use (every process on the device)",
                              ["gpu"], multiprocess_mode="livemax"),
        gpu_memory_total=Gauge("ptx_gpu_memory_total_bytes", "GPU memory size", ["gpu"],
                               multiprocess_mode="livemax"),
        http_requests=Counter("ptx_http_requests", "HTTP requests by route template, method and status class",
                              ["route", "method", "status"]),
        http_seconds=Histogram("ptx_http_request_seconds", "HTTP request latency by route template, seconds",
                               ["route", "method"], buckets=_LATENCY_BUCKETS),
        ood=Counter("ptx_ood", "Films read against the classifier's out-of-distribution description, by flag",
                    ["flag"]),
        reader_feedback=Counter("ptx_reader_feedback", "Readers' verdicts on the service's findings, by the priority "
                                "they saw", ["priority", "verdict"]),
        decode_fallbacks=Counter("ptx_reduced_decode_fallbacks", "Reduced-resolution decodes that fell back to a "
                                 "full decode, by reason", ["reason"]),
        notifications=Counter("ptx_notifications", "Pushed notification attempts by channel and outcome",
                              ["channel", "outcome"]),
        remote_triage=Counter("ptx_remote_triage", "The intake's triage calls to PTX_TRIAGE_URL, by outcome "
                              "(busy: a 503 waited out, not a failure)", ["outcome"]),
        outputs_pending=Gauge("ptx_outputs_pending", "Findings whose SEG/SR/SC are not written yet (retried)",
                              multiprocess_mode="livemax"),
    )


_children: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}


def child(metric: Any, **labels: str) -> Any:
    """`metric.labels(**labels)`, cached: in multiprocess mode `labels()` costs more than the observation,
    and the label sets are bounded, so the cache is too."""
    key = (id(metric), tuple(sorted(labels.items())))
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(**labels)
    return found


# --------------------------------------------------------------------------------------------------------------
# Resources: sampled by a daemon thread in each process, because nothing else exports them in multiprocess mode

RESOURCE_INTERVAL_S = 10.0


def _gpu_memory() -> list[tuple[int, int]]:
    """(used, total) bytes of each NVIDIA device NVML sees; [] without a GPU or a driver (the usual CPU box).

    NVML (`nvidia-ml-py`, a BentoML dependency) rather than torch.cuda: it sees every process's allocations,
    ONNX Runtime's and TensorRT's included, not only torch's own allocator.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 -- no libnvidia-ml, no driver: nothing to report
        return []
    try:
        devices = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [(int(info.used), int(info.total)) for info in map(pynvml.nvmlDeviceGetMemoryInfo, devices)]
    except Exception:  # noqa: BLE001 -- a driver hiccup must not stop the sampler
        log.debug("NVML could not read GPU memory", exc_info=True)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def sample_resources(role: str, gpu: bool = False, gpu_memory: Callable[[], list[tuple[int, int]]] = _gpu_memory
                     ) -> None:
    """One reading: this process's resident memory under `role`; with `gpu`, each device's memory."""
    import psutil

    registry = metrics()
    child(registry.resident_memory, role=role).set(psutil.Process().memory_info().rss)
    if gpu:
        for index, (used, total) in enumerate(gpu_memory()):
            child(registry.gpu_memory_used, gpu=str(index)).set(used)
            child(registry.gpu_memory_total, gpu=str(index)).set(total)


def start_resource_sampler(role: str, gpu: bool = False, interval_s: float = RESOURCE_INTERVAL_S) -> threading.Thread:
    """Sample now (so /metrics has the values from the start), then every `interval_s` in a daemon thread."""

    def loop() -> None:
        while True:
            try:
                sample_resources(role, gpu)
            except Exception:  # noqa: BLE001 -- a failed reading must not end the sampling
                log.warning("could not sample process resources", exc_info=True)
            time.sleep(interval_s)

    metrics()  # every metric family exists before the first request or scrape, not at the first sample
    thread = threading.Thread(target=loop, name=f"ptx-resources-{role}", daemon=True)
    thread.start()
    return thread
