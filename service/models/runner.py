"""The model worker's logic: load both backends, warm them up, run batched classify / segment steps.

No BentoML here: `service.app.Models` wraps a `ModelRunner` in two batchable endpoints. Each output row
carries two trailing numbers -- the duration of the batched run it was part of and that batch's size -- so
the HTTP edge can tell a request's queue wait from compute without a second channel (`pack` / `unpack`).
A classifier row is [score, OOD distance] (`CLASSIFY_ROW`): the worker measures the distance from the
features in the same batched run (service/models/ood.py), so the features never cross the wire.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.metrics import metrics, start_resource_sampler
from service.models.backends import Backend
from service.models.backends.hardware_probe import probe_gpu
from service.models.health import ModelHealth, ModelUnavailable, check_output
from service.models.inference import classify_rows, classify_scores, segment_maps
from service.models.model_set import ModelEntry, ModelSet
from service.models.ood import OodModel
from service.settings import Settings

log = logging.getLogger("ptx.runtime")

BackendLoader = Callable[[ModelEntry, Settings], Backend]
CLASSIFY_ROW = (2,)  # per-film shape of the classifier's output: [triage score, OOD distance or NO_DISTANCE]


def pack(outputs: np.ndarray, seconds: float) -> np.ndarray:
    """(N, ...) outputs → (N, K + 2) float32 rows: the flattened output, the batch's run time and size."""
    count = len(outputs)
    flat = np.asarray(outputs, dtype=np.float32).reshape(count, -1)
    trailer = np.tile(np.array([seconds, count], dtype=np.float32), (count, 1))
    return np.concatenate([flat, trailer], axis=1)


@dataclass(frozen=True)
class Unpacked:
    outputs: np.ndarray  # (N, *shape)
    seconds: np.ndarray  # (N,) duration of the batched run each row came from
    batch_sizes: np.ndarray  # (N,) size of that batch


def unpack(packed: np.ndarray, shape: tuple[int, ...]) -> Unpacked:
    """Inverse of `pack` for per-item output `shape` (() for a score, (S, S) for a map)."""
    packed = np.asarray(packed, dtype=np.float32)
    expected = int(np.prod(shape, dtype=np.int64)) + 2
    if packed.ndim != 2 or packed.shape[1] != expected:
        raise ValueError(f"packed model output has shape {packed.shape}, expected (N, {expected})")
    count = len(packed)
    return Unpacked(packed[:, :-2].reshape((count, *shape)), packed[:, -2].copy(), packed[:, -1].astype(int))


def default_loader(entry: ModelEntry, settings: Settings) -> Backend:
    from service.models.backends.factory import load_backend

    cache = settings.trt_cache_dir or settings.data_dir / "trt-cache"
    return load_backend(entry.directory, entry.manifest, settings.backend,
                        intra_op_threads=settings.intra_op_threads, spinning=settings.ort_spinning,
                        cache_dir=cache, precision=settings.precision)


def observed_by(registry: Any) -> Callable[[str, np.ndarray, np.ndarray], np.ndarray]:
    """`observe(model, batch, packed)`: batch size and run time per batch into `registry`, `packed` returned
    (children cached: `labels()` costs more than `observe()`)."""
    children = {role: (registry.batch_size.labels(model=role), registry.model_batch_seconds.labels(model=role))
                for role in ("classifier", "segmenter")}

    def observe(model: str, batch: np.ndarray, packed: np.ndarray) -> np.ndarray:
        sizes, seconds = children[model]
        sizes.observe(len(batch))
        seconds.observe(float(packed[0, -2]) if len(packed) else 0.0)
        return packed

    return observe


class ModelRunner:
    """Both models, loaded once, one run at a time (a lock: on a CPU box both models want every core; on a
    GPU, one stream), or PTX_MODEL_INSTANCES runs at once, each on its own threads (the models in the edge: two
    one-thread runs spend less CPU per film on 2 cores than one two-thread run). A run that fails or answers
    NaN takes its model out of service (`ModelHealth`): calls raise `ModelUnavailable` until a probe after the
    cool-down passes."""

    def __init__(self, models: ModelSet, settings: Settings, loader: BackendLoader = default_loader,
                 on_health_change: Callable[[str, bool], None] = lambda role, ready: None) -> None:
        self.models = models
        self.settings = settings
        self.classifier = loader(models.classifier, settings)
        self.segmenter = loader(models.segmenter, settings)
        stats = models.classifier.manifest.ood
        self.ood = None if stats is None else OodModel.from_statistics(stats)
        self._lock = threading.BoundedSemaphore(settings.model_instances)  # runs at once (PTX_MODEL_INSTANCES)
        for entry, backend in ((models.classifier, self.classifier), (models.segmenter, self.segmenter)):
            log.info("%s: %s on %s (provider %s)", entry.role, entry.label, backend.name,
                     getattr(backend, "provider", "unknown"))
        self.health = ModelHealth(settings.model_cooldown_s,
                                  {role: functools.partial(self._probe, role) for role in ("classifier", "segmenter")},
                                  on_change=on_health_change)
        for role in ("classifier", "segmenter"):
            self.health.remember(role)

    @classmethod
    def for_worker(cls, models: ModelSet, settings: Settings) -> ModelRunner:
        """The model worker's runner: resources watched from the start (memory is worth watching while the
        models load), health and model identity exported as metrics, warmed up when PTX_WARMUP is set."""
        registry = metrics()
        registry.gpu_visible.set(1 if probe_gpu() is not None else 0)
        start_resource_sampler("models", gpu=True)
        runner = cls(models, settings, on_health_change=lambda role, ready: registry.ready.labels(
            role=role).set(1 if ready else 0))
        if settings.warmup:
            runner.warmup((1, settings.max_batch_size))
        for entry, backend in zip(models.entries(), (runner.classifier, runner.segmenter)):
            registry.model_info.labels(role=entry.role, name=entry.manifest.name, version=entry.manifest.version,
                                       backend=backend.name, provider=getattr(backend, "provider", "unknown")).set(1)
            registry.ready.labels(role=entry.role).set(1)
        return runner

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Packed [score, OOD distance] rows (N, 4) for a preprocessed classifier batch."""
        batch = self._check(batch, self.models.classifier_spec.size)
        return self._run("classifier", lambda: classify_rows(self.classifier, batch, self.settings.hflip_tta, self.ood))

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """Packed probability maps (N, S·S + 2) for a preprocessed segmenter batch."""
        batch = self._check(batch, self.models.segmenter_spec.size)
        return self._run("segmenter", lambda: segment_maps(self.segmenter, batch, self.settings.hflip_tta))

    def _run(self, role: str, step: Callable[[], np.ndarray]) -> np.ndarray:
        """`step` under the lock, its output checked (probabilities: finite, in [0, 1]), then packed."""
        self.health.require(role)
        try:
            with self._lock:
                started = time.perf_counter()  # the run itself, not a wait for a probe to finish
                outputs = step()
                seconds = time.perf_counter() - started
            if role == "classifier":  # scores are probabilities; distances finite (or NO_DISTANCE, -1)
                check_output(role, outputs[:, 0], 0.0, 1.0)
                check_output(role, outputs[:, 1], -1.0)
            else:
                check_output(role, outputs, 0.0, 1.0)
        except Exception as exc:
            self.health.failed(role, exc)
            raise ModelUnavailable(role, f"its run failed: {type(exc).__name__}") from exc
        return pack(outputs, seconds)

    def _probe(self, role: str) -> np.ndarray:
        """`role` on its warm-up input (one film of zeros, no TTA): what ModelHealth compares with the start."""
        spec, run, backend = ((self.models.classifier_spec, classify_scores, self.classifier) if role == "classifier"
                              else (self.models.segmenter_spec, segment_maps, self.segmenter))
        with self._lock:
            return run(backend, np.zeros((1, spec.channels, spec.size, spec.size), dtype=np.float32), False)

    @staticmethod
    def _check(batch: np.ndarray, size: int) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[2:] != (size, size):
            raise ValueError(f"model input must be (N, C, {size}, {size}), got {batch.shape}")
        return batch

    def warmup(self, batch_sizes: tuple[int, ...]) -> dict[str, float]:
        """Run each model once at each batch size (first runs allocate and, on GPUs, build engines)."""
        timings = {}
        for role, spec, step in (("classifier", self.models.classifier_spec, self.classify),
                                 ("segmenter", self.models.segmenter_spec, self.segment)):
            started = time.perf_counter()
            for size in sorted(set(batch_sizes)):
                step(np.zeros((size, spec.channels, spec.size, spec.size), dtype=np.float32))
            timings[role] = time.perf_counter() - started
        log.info("warm-up at batch sizes %s took %s", sorted(set(batch_sizes)),
                 {k: f"{v:.2f} s" for k, v in timings.items()})
        return timings
