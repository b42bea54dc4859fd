"""Issue 13 §11: the long fuzz run (load_tests/fuzz_long.py) survives any seed and always reports its counts.

Seed 8675309 stopped the run with Hypothesis's FlakyStrategyDefinition once its time budget ran out: the case
body checked the clock and only then drew its plan, so the same choices led to different draws. Here the
run's own `child` runs in-process on a clock that advances one second per reading, so the budget runs out
in the middle of the run at the same case every time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

import tests.fuzz_cases as fuzz_cases

REPO = Path(__file__).resolve().parents[2]
SMALL = ("chest/siim_cr_jpegbaseline_mono2.dcm", "other/MR_small_RLE.dcm", "other/CT_small.dcm",
         "corrupt/MR_truncated.dcm")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every mangled element


class Clock:
    """time.monotonic that advances one second per reading: a budget of N s ends after about N readings."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def fuzz_long() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_long_under_test", REPO / "load_tests" / "fuzz_long.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(monkeypatch: pytest.MonkeyPatch, out: Path, seed: int, **options: object) -> dict:
    module = fuzz_long()
    monkeypatch.setattr(module, "time", Clock())
    monkeypatch.setattr(fuzz_cases, "ALL_FILES", SMALL)  # read by `child` when it runs: four quick files
    return module.child("imaging", examples=150, seconds=40, seed=seed, case_timeout_s=30, out=out, url="",
                        **options)


@pytest.mark.parametrize("seed", [8675309, 12345, 20261206])
def test_the_budget_running_out_mid_run_ends_it_cleanly_with_its_counts(realdata, monkeypatch, tmp_path, seed):
    """Fails on the old run for each of these seeds: FlakyStrategyDefinition raised out of `child`, no counts."""
    summary = run_child(monkeypatch, tmp_path, seed)
    assert summary.get("harness_errors", {}) == {} and summary["findings"] == {}
    assert 20 <= summary["cases"] <= 40, "cases ran until the budget, and none after it"
    assert sum(summary["outcomes"].values()) == summary["cases"]


def test_the_same_seed_runs_the_same_cases(realdata, monkeypatch, tmp_path):
    """Cases are a function of the seed alone: two runs give the same outcomes, another seed others."""
    first = run_child(monkeypatch, tmp_path, 8675309)
    assert run_child(monkeypatch, tmp_path, 8675309)["outcomes"] == first["outcomes"]
    assert run_child(monkeypatch, tmp_path, 8675310)["outcomes"] != first["outcomes"]


def test_a_harness_error_ends_one_batch_and_the_run_goes_on(realdata, monkeypatch, tmp_path):
    """An error outside any case (here: preparing the 5th case's bytes) is counted with its type; the later
    batches still run and the counts come back."""
    calls = {"n": 0}
    apply_plan = fuzz_cases.apply_plan

    def failing_once(plan: fuzz_cases.Plan, files: dict[str, bytes]) -> bytes:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("the harness broke")
        return apply_plan(plan, files)

    monkeypatch.setattr(fuzz_cases, "apply_plan", failing_once)
    summary = run_child(monkeypatch, tmp_path, 8675309, batch=10)
    assert summary["harness_errors"] and all(key.split(":")[0] in ("RuntimeError", "FlakyFailure", "Flaky")
                                             for key in summary["harness_errors"]), summary["harness_errors"]
    assert summary["batches"] >= 3 and summary["cases"] >= 20, summary
