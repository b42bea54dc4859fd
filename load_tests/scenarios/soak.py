"""Soak: a moderate, paced load held for a long time (bounded by -t); latency and errors must not drift.

    .venv/bin/locust -f load_tests/scenarios/soak.py --headless --host http://127.0.0.1:3000 \\
        -u 8 -r 8 -t 10m --pace-s 1 --csv data/load/soak --only-summary

Each user sends one request every `--pace-s` seconds (Locust's constant_pacing: the wait makes up the rest
of the interval, none when a request takes longer), so the offered load is users / pace requests per
second whatever the latency: an open-ish load, below capacity by choice (about half of the sustainable
throughput is the intent: see `python -m load_tests.capacity`). `<prefix>_windows.csv` cuts the run into
ten equal slices; the summary row adds the last slice's p99 and throughput over the first's
(`p99_drift`, `throughput_drift`): a leak or a growing queue shows as a drift well above 1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Locust imports this file by path

from locust import constant_pacing, events  # noqa: E402

from load_tests.scenarios.common import SCENARIO, TriageUser  # noqa: E402
from load_tests.scenarios.summary import Sample  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--pace-s", type=float, default=1.0, help="seconds between one user's requests")


class Soak(TriageUser):
    def wait_time(self) -> float:
        # constant_pacing keeps its clock on the user instance, so building it per call is fine.
        return constant_pacing(self.environment.parsed_options.pace_s)(self)


def _drift(samples: list[Sample], windows: list[dict]) -> dict:
    first, last = windows[0], windows[-1]

    def ratio(a: float, b: float) -> float:
        return round(b / a, 3) if a and not math.isnan(a) and not math.isnan(b) else math.nan

    return {"p99_drift": ratio(first["p99_ms"], last["p99_ms"]),
            "throughput_drift": ratio(first["throughput_films_s"], last["throughput_films_s"])}


SCENARIO.update(name="soak", extra=_drift)
