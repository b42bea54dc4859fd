"""Steady triage load: a constant number of users, no think time, the corpus mix (see common.py).

    .venv/bin/python -m load_tests.corpus                        # once: data/load/corpus (deterministic)
    .venv/bin/locust -f load_tests/scenarios/steady.py --headless --host http://127.0.0.1:3000 \\
        -u 8 -r 8 -t 3m --csv data/load/steady --only-summary [--summary-warmup 10]

Each user posts one request after another, so `-u` is the number of requests in flight: a closed-loop
load whose throughput is the service's at that concurrency. `python -m load_tests.capacity` runs this
scenario at increasing `-u`. Writes Locust's CSVs plus data/load/steady_summary.csv (one row) and
data/load/steady_windows.csv (ten equal slices of the run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Locust imports this file by path

from locust import constant  # noqa: E402

from load_tests.scenarios.common import SCENARIO, TriageUser  # noqa: E402

SCENARIO["name"] = "steady"


class Steady(TriageUser):
    wait_time = constant(0)
