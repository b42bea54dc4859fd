"""The steady scenario under its historical name; the scenarios live in load_tests/scenarios/.

    .venv/bin/python -m load_tests.corpus
    .venv/bin/locust -f load_tests/locustfile.py --headless --host http://127.0.0.1:3000 \\
        -u 16 -r 16 -t 3m --csv data/load/steady --only-summary

Same as `-f load_tests/scenarios/steady.py`. The others: `scenarios/burst.py` (a spike beyond capacity,
503 shedding and recovery) and `scenarios/soak.py` (paced load for a long time); the corpus and the checks
of every answer are described in `load_tests/corpus.py` and `load_tests/scenarios/common.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Locust imports this file by path

from load_tests.scenarios.steady import Steady  # noqa: E402 -- the user class Locust runs

__all__ = ["Steady"]
