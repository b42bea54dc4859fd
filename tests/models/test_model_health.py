"""The model circuit breaker (service/model_health.py) and the runner using it: failed runs take a model out of
service, nothing computed by a failing model is returned, a probe after the cool-down brings it back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.models.backends.onnxruntime_cpu import OnnxRuntimeCPU
from service.models.health import (
    InvalidModelOutput,
    ModelHealth,
    ModelUnavailable,
    check_output,
)
from service.models.model_set import resolve
from service.models.runner import ModelRunner
from service.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health_with(probe_outputs: list[object], cooldown_s: float = 10) -> tuple[ModelHealth, Clock, list]:
    """A ModelHealth whose one model's probe returns (or raises) the given outputs in turn."""
    clock, changes, outputs = Clock(), [], iter(probe_outputs)

    def probe() -> np.ndarray:
        value = next(outputs)
        if isinstance(value, Exception):
            raise value
        return np.asarray(value, dtype=np.float32)

    health = ModelHealth(cooldown_s, {"classifier": probe}, on_change=lambda role, ok: changes.append((role, ok)),
                         clock=clock)
    return health, clock, changes


def test_a_failure_takes_the_model_out_until_a_probe_after_the_cool_down_passes():
    health, clock, changes = health_with([[0.2], [0.2]])
    health.remember("classifier")
    assert health.ready() and health.usable("classifier")
    health.failed("classifier", RuntimeError("CUDA error: device lost"))
    assert changes == [("classifier", False)]
    clock.now += 9.9
    assert not health.ready()
    with pytest.raises(ModelUnavailable, match="classifier is out of service .*CUDA error: device lost"):
        health.require("classifier")
    clock.now += 0.2
    assert health.ready() and changes == [("classifier", False), ("classifier", True)]
    health.require("classifier")


@pytest.mark.parametrize("probe_output, reason", [
    (RuntimeError("still broken"), "still broken"),
    ([float("nan")], "non-finite"),
    ([0.7], "differs from the one recorded at start"),
])
def test_a_failing_or_different_probe_keeps_the_model_out_for_another_cool_down(probe_output, reason):
    health, clock, changes = health_with([[0.2], probe_output, [0.2]])
    health.remember("classifier")
    health.failed("classifier", RuntimeError("boom"))
    clock.now += 10
    assert not health.ready()
    with pytest.raises(ModelUnavailable, match=reason):
        health.require("classifier")
    clock.now += 9  # the failed probe restarted the cool-down
    assert not health.usable("classifier")
    clock.now += 1
    assert health.usable("classifier") and changes[-1] == ("classifier", True)


def test_check_output_refuses_non_finite_and_out_of_range_values():
    assert check_output("segmenter", np.array([0.0, 1.0]), 0.0, 1.0).tolist() == [0.0, 1.0]
    with pytest.raises(InvalidModelOutput, match="2 non-finite"):
        check_output("segmenter", np.array([np.nan, np.inf, 0.5]))
    with pytest.raises(InvalidModelOutput, match=r"outside \[0.0, 1.0\]"):
        check_output("classifier", np.array([0.5, 1.5]), 0.0, 1.0)


class Faulty:
    """The real demo model, made to fail on demand (a unit test of the runner's own logic)."""

    def __init__(self, inner: OnnxRuntimeCPU) -> None:
        self.inner, self.mode, self.calls = inner, "ok", 0
        self.name = inner.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._maybe_raise(batch)
        return self._maybe_nan(batch, self.inner.run(batch))

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's path when its manifest has `ood` (logits and features), failing as `run` does."""
        self._maybe_raise(batch)
        out, features = self.inner.run_with_features(batch)
        return self._maybe_nan(batch, out), features

    def _maybe_raise(self, batch: np.ndarray) -> None:
        self.calls += 1
        if self.mode == "raise" and batch.max() > 0:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : kernel failed")

    def _maybe_nan(self, batch: np.ndarray, out: np.ndarray) -> np.ndarray:
        return np.full_like(out, np.nan) if self.mode == "nan" and batch.max() > 0 else out

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_the_runner_returns_no_result_from_a_failing_model_and_recovers(mode):
    settings = load_settings(environ={"PTX_MODEL_COOLDOWN_S": "0.2"})
    models = resolve(settings)
    backends = {}

    def loader(entry, settings):
        backends[entry.role] = Faulty(OnnxRuntimeCPU(entry.directory / entry.manifest.files["onnx"],
                                                      intra_op_threads=1))
        return backends[entry.role]

    changes = []
    runner = ModelRunner(models, settings, loader=loader, on_health_change=lambda r, ok: changes.append((r, ok)))
    film = np.full((2, 1, models.classifier_spec.size, models.classifier_spec.size), 0.5, dtype=np.float32)
    good = runner.classify(film)
    backends["classifier"].mode = mode
    with pytest.raises(ModelUnavailable, match="classifier is out of service"):
        runner.classify(film)
    calls = backends["classifier"].calls
    with pytest.raises(ModelUnavailable):  # refused during the cool-down without running the model
        runner.classify(film)
    assert backends["classifier"].calls == calls and not runner.health.ready()
    assert changes == [("classifier", False)]
    # The segmenter is not affected by the classifier's failure.
    runner.segment(np.zeros((1, 1, models.segmenter_spec.size, models.segmenter_spec.size), dtype=np.float32))
    backends["classifier"].mode = "ok"
    time.sleep(0.25)
    assert runner.health.ready() and changes[-1] == ("classifier", True)
    np.testing.assert_allclose(runner.classify(film)[:, :-2], good[:, :-2], atol=1e-6)


def test_the_intake_waits_out_a_503_without_failing_the_film():
    from service.cascade.served import until_available
    from service.http.answers import ApiError

    outcomes = [ApiError(503, "model_unavailable", "out"), ApiError(503, "overloaded", "full"), "finding"]
    calls = []

    async def call():
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert asyncio.run(until_available(call, 0.01)) == "finding" and len(calls) == 3

    async def bad_request():
        raise ApiError(400, "not_dicom", "no")

    with pytest.raises(ApiError, match="no"):  # anything but a 503 is the intake's to handle
        asyncio.run(until_available(bad_request, 0.01))
