"""Burst: low load, a spike well beyond capacity, low load again; the service must shed and then recover.

    .venv/bin/locust -f load_tests/scenarios/burst.py --headless --host http://127.0.0.1:3000 \\
        --csv data/load/burst --only-summary [--burst-low-users 2 --burst-peak-users 160 \\
        --burst-low-s 60 --burst-peak-s 30 --burst-recover-s 90]

The shape (a Locust LoadTestShape; -u/-r/-t are ignored): `--burst-low-users` for `--burst-low-s`, then
`--burst-peak-users` (all started within a second) for `--burst-peak-s`, then back to the low count for
`--burst-recover-s`; the run ends there. With the defaults the spike keeps 160 requests in flight, over
twice the edge's admission limit (PTX_MAX_IN_FLIGHT, 64 per edge worker), so the service must answer
503 `overloaded` with Retry-After: those are counted apart (`shed 503`), never as failures, and users
wait Retry-After before their next request. Users stopped at the end of the spike are stopped at once
(their requests in flight are dropped by the client; the service still finishes them).

`<prefix>_windows.csv` has one row per phase (low, peak, recover-early, recover-late); the summary row adds
`peak_shed_share`, `recovered` (true when the second half of the recovery phase had answers, no 503 and
no failure) and `recover_p99_ratio` (that half's p99 over the low phase's: about 1 once fully recovered).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Locust imports this file by path

from locust import LoadTestShape, constant, events  # noqa: E402

from load_tests.scenarios.common import SCENARIO, TriageUser  # noqa: E402
from load_tests.scenarios.summary import Sample  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("burst shape")
    group.add_argument("--burst-low-users", type=int, default=2)
    group.add_argument("--burst-peak-users", type=int, default=160)
    group.add_argument("--burst-low-s", type=float, default=60.0)
    group.add_argument("--burst-peak-s", type=float, default=30.0)
    group.add_argument("--burst-recover-s", type=float, default=90.0)


def phases(options) -> list[tuple[str, float, float, int]]:
    """(name, start s, end s, users) of the shape; the recovery is halved so its late half stands alone."""
    low, peak, recover = options.burst_low_s, options.burst_peak_s, options.burst_recover_s
    return [("low", 0.0, low, options.burst_low_users),
            ("peak", low, low + peak, options.burst_peak_users),
            ("recover-early", low + peak, low + peak + recover / 2, options.burst_low_users),
            ("recover-late", low + peak + recover / 2, low + peak + recover, options.burst_low_users)]


class Burst(TriageUser):
    wait_time = constant(0)


class BurstShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        steps = phases(self.runner.environment.parsed_options)
        rate = max(users for *_, users in steps)  # start or stop a whole step within a second
        for _name, _start, end, users in steps:
            if elapsed < end:
                return users, rate
        return None


_OPTIONS: list = []  # the parsed options, for the summary's windows


def _windows(_length: float) -> list[tuple[str, float, float]]:
    return [(name, start, end) for name, start, end, _ in phases(_OPTIONS[0])]


@events.init.add_listener
def _remember_options(environment, **_kwargs) -> None:
    _OPTIONS[:] = [environment.parsed_options]


def _recovery(samples: list[Sample], windows: list[dict]) -> dict:
    """Did the service come back: answers, no 503 and no failure in the late half of the recovery; and how
    its p99 there compares with the low phase's before the spike (close to 1 when fully recovered)."""
    by_name = {w["window"]: w for w in windows}
    low, peak, late = by_name["low"], by_name["peak"], by_name["recover-late"]
    recovered = late["triaged"] > 0 and late["shed_503"] == 0 and late["failures"] == 0
    ratio = late["p99_ms"] / low["p99_ms"] if low["p99_ms"] and not math.isnan(low["p99_ms"]) else math.nan
    return {"peak_shed_share": peak["shed_share"], "low_p99_ms": low["p99_ms"],
            "recover_late_p99_ms": late["p99_ms"], "recover_p99_ratio": round(ratio, 3), "recovered": recovered}


SCENARIO.update(name="burst", windows=_windows, extra=_recovery)
