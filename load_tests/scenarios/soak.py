"""Soak: a moderate, paced load held for a long time (bounded by -t); latency and errors must not drift.

    .venv/bin/locust -f load_tests/scenarios/soak.py --headless --host http://127.0.0.1:3000 \\
        -u 8 -r 8 -t 10m --pace-s 1 --csv data/load/soak --only-summary

Each user sends one request every `--pace-s` seconds (the wait makes up the rest of the interval, none when a
request takes longer; each user at its own random phase), so the offered load is users / pace requests per
second whatever the latency: an open-ish load, below capacity by choice (about half of the sustainable
throughput is the intent: see `python -m load_tests.capacity`). `<prefix>_windows.csv` cuts the run into
ten equal slices; the summary row adds the last slice's p99 and throughput over the first's
(`p99_drift`, `throughput_drift`): a leak or a growing queue shows as a drift well above 1.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Locust imports this file by path

import gevent  # noqa: E402
from locust import events  # noqa: E402

from load_tests.scenarios.common import SCENARIO, TriageUser  # noqa: E402
from load_tests.scenarios.summary import Sample  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--pace-s", type=float, default=1.0, help="seconds between one user's requests")


class Soak(TriageUser):
    """Paces itself: one request every --pace-s, each user at its own random phase of the interval.

    Not Locust's constant_pacing: it times a user's first interval from the user's creation, so every
    user's second request falls at the same instant (creation + pace) whatever phase it started at, and
    the users then stay in step: the service saw one burst of all users per interval instead of a steady
    rate (measured, same mix at ~16 films/s: p50/p99 368/662 ms bunched; 49/265 ms spread).
    """

    def on_start(self) -> None:
        super().on_start()
        phase = self.rng.uniform(0, self.environment.parsed_options.pace_s)
        self.next_start = time.perf_counter() + phase
        gevent.sleep(phase)

    def wait_time(self) -> float:
        now = time.perf_counter()
        # The next slot; one that has passed already (a request longer than the pace) is not made up later.
        self.next_start = max(self.next_start + self.environment.parsed_options.pace_s, now)
        return self.next_start - now


def _drift(samples: list[Sample], windows: list[dict]) -> dict:
    first, last = windows[0], windows[-1]

    def ratio(a: float, b: float) -> float:
        return round(b / a, 3) if a and not math.isnan(a) and not math.isnan(b) else math.nan

    return {"p99_drift": ratio(first["p99_ms"], last["p99_ms"]),
            "throughput_drift": ratio(first["throughput_films_s"], last["throughput_films_s"])}


SCENARIO.update(name="soak", extra=_drift)
