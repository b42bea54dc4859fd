"""The service's own Prometheus metrics, beside BentoML's request and adaptive-batching metrics.

Why created lazily (`metrics()`), never at import: BentoML runs each service in worker processes and sets
`PROMETHEUS_MULTIPROC_DIR` only after importing the service module; prometheus_client decides at its first
import whether to write multiprocess files, and `/metrics` only shows what those files hold.

Label values are bounded sets (stage names, model roles, rejection codes, priorities): never UIDs or
anything a request can choose freely, so the number of series stays fixed whatever traffic arrives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

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
