"""Is each model fit to serve? A circuit breaker per model: a failed run takes it out of service.

Why: a backend can fail at run time (a CUDA error, a lost device, out of memory, a corrupted engine, a bug
that only some inputs reach) or answer with NaN. Either way the service must not hand out a result it did not
compute, and must tell the orchestrator: the model worker's `/readyz` turns unready, so the edge's turns
unready too (Kubernetes stops routing to the replica), and every call is refused with 503
`model_unavailable` instead of queueing for a model that keeps failing.

How it recovers: after `cooldown_s` the next readiness check or call runs a probe -- the warm-up input,
whose output must be finite and equal (within tolerance) to the output recorded when the model was warmed
up at start. A model that passes is back in service; one that fails stays out for another cool-down.
A probe cannot prove that every input works (a fault reached only by some films comes back at the next
such film, and takes the model out again); it does prove that the engine runs and still computes what it
computed at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError

log = logging.getLogger("ptx.model_health")

PROBE_TOLERANCE = 1e-3  # same engine, same input: outputs match to float rounding (threads may reorder sums)


class ModelUnavailable(ServiceError, RuntimeError):
    """A model is out of service (failed, or cooling down after a failure); the film was not triaged."""

    code, http_status = "model_unavailable", 503

    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"the {role} is out of service ({reason}); retry later")
        self.role = role


class InvalidModelOutput(ServiceError, RuntimeError):
    """A model answered with values it cannot produce (NaN, infinity, out of range)."""

    code, http_status = "invalid_model_output", 503


def check_output(role: str, outputs: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """`outputs` unchanged if finite and within [low, high]; else InvalidModelOutput naming the problem."""
    values = np.asarray(outputs)
    if not np.all(np.isfinite(values)):
        raise InvalidModelOutput(f"{role} output holds {int(np.count_nonzero(~np.isfinite(values)))} "
                                 "non-finite value(s)")
    if values.size and ((low is not None and values.min() < low) or (high is not None and values.max() > high)):
        raise InvalidModelOutput(f"{role} output outside [{low}, {high}]: min {values.min():.4g}, "
                                 f"max {values.max():.4g}")
    return outputs


@dataclass
class _State:
    failed_at: float | None = None
    reason: str = ""
    failures: int = 0


@dataclass
class ModelHealth:
    """Failure state of each model role, with a probe to bring a failed one back.

    `probes[role]()` runs the model on its warm-up input and returns the output; `references[role]` is that
    output recorded at start (`remember`). `on_change(role, ready)` reports transitions (the readiness gauge).
    """

    cooldown_s: float
    probes: dict[str, Callable[[], np.ndarray]]
    on_change: Callable[[str, bool], None] = lambda role, ready: None
    clock: Callable[[], float] = time.monotonic
    references: dict[str, np.ndarray] = field(default_factory=dict)
    _states: dict[str, _State] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def remember(self, role: str) -> None:
        """Record the probe's output now, while the model is known good (after warm-up)."""
        self.references[role] = np.asarray(self.probes[role]()).copy()

    def failed(self, role: str, exc: BaseException) -> None:
        """A run of `role` failed: out of service from now for `cooldown_s`."""
        with self._lock:
            state = self._states.setdefault(role, _State())
            newly = state.failed_at is None
            state.failed_at, state.reason = self.clock(), f"{type(exc).__name__}: {exc}"[:300]
            state.failures += 1
        if newly:
            log.error("%s taken out of service after a failed run (%s); probing again in %.0f s",
                      role, state.reason, self.cooldown_s)
            self.on_change(role, False)

    def usable(self, role: str) -> bool:
        """True when `role` may run: never failed, or failed and has passed a probe after its cool-down."""
        state = self._states.get(role)
        if state is None or state.failed_at is None:
            return True
        if self.clock() - state.failed_at < self.cooldown_s:
            return False
        return self._probe(role, state)

    def require(self, role: str) -> None:
        """Raise ModelUnavailable unless `role` is usable."""
        if not self.usable(role):
            state = self._states[role]
            raise ModelUnavailable(role, f"failed: {state.reason}")

    def ready(self) -> bool:
        """Every model usable (probing those whose cool-down is over)."""
        return all([self.usable(role) for role in self.probes])

    def _probe(self, role: str, state: _State) -> bool:
        try:
            output = np.asarray(self.probes[role]())
            check_output(role, output)
            reference = self.references.get(role)
            if reference is not None and (reference.shape != output.shape
                                          or not np.allclose(output, reference, atol=PROBE_TOLERANCE)):
                raise InvalidModelOutput(f"{role} probe output differs from the one recorded at start")
        except Exception as exc:  # noqa: BLE001 -- any failure of the probe keeps the model out of service
            with self._lock:
                state.failed_at, state.reason = self.clock(), f"probe: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s probe failed (%s); out of service for another %.0f s", role, state.reason,
                        self.cooldown_s)
            return False
        with self._lock:
            state.failed_at, state.reason = None, ""
        log.info("%s passed its probe; back in service", role)
        self.on_change(role, True)
        return True
