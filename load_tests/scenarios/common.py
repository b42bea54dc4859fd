"""What every scenario shares: the triage user, its checks, the record of every request, the summary CSVs.

A user draws each request from the corpus mix (`load_tests.corpus`: 22 % films the service calls
positive, 75 % negative, 3 % rejects; `?mask=none` or `png` for films) with its own seeded RNG, and checks
the answer against what the corpus expects for that film:

* a film: 200 with a numeric score and the expected label (a label the service did not give when the
  corpus was scored is a failure, so is a 200 without a score);
* a reject: its status and error code (400 `not_dicom`, 422 `not_chest`, 422 `not_radiograph`): success;
* 503 `overloaded` with a Retry-After header is the service shedding load, not a failure: it is renamed
  `shed 503` in Locust's table and counted apart, and the user waits Retry-After (at most
  `--retry-after-cap` s) before its next request, as a PACS router should. A 503 without Retry-After, or
  with another code (`model_unavailable`), is a failure.

Every request is also recorded here (start, end, kind, outcome) so that the summary has exact
percentiles and per-window figures. When the run stops, the scenario writes, beside Locust's own `--csv`
files, `<prefix>_summary.csv` (one row: requests, failures, 503 share, p50/p95/p99 of triaged films,
throughput, positive share...) and `<prefix>_windows.csv` (the same per window: the burst's phases, or
ten equal slices of a steady or soak run), and prints the summary as one `SUMMARY ...` line.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from pathlib import Path

from locust import FastHttpUser, events, task

from load_tests.corpus import DEFAULT_DIR, MIX, Corpus, load, parse_mix, pick
from load_tests.scenarios.summary import (
    Sample,
    equal_windows,
    expectation_problem,
    summarise,
    write_row,
    write_rows,
)

HEADERS = {"Content-Type": "application/dicom"}
SHED = "shed 503"


# --- options ----------------------------------------------------------------------------------------------

@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("ptx-triage scenarios")
    group.add_argument("--corpus", default=str(DEFAULT_DIR), env_var="PTX_LOAD_CORPUS",
                       help="corpus folder built by `python -m load_tests.corpus` (default %(default)s)")
    group.add_argument("--mix-seed", type=int, default=0, help="seed of the users' request draws")
    group.add_argument("--mix", default=",".join(f"{kind}={weight}" for kind, weight in MIX.items()),
                       help="request weights by pool (default %(default)s)")
    group.add_argument("--summary-warmup", type=float, default=0.0,
                       help="seconds at the start left out of the summary row (not of the windows)")
    group.add_argument("--retry-after-cap", type=float, default=5.0,
                       help="longest wait after a 503 whatever its Retry-After says")


@functools.cache
def corpus_at(folder: str) -> Corpus:
    return load(Path(folder))


# --- the record -------------------------------------------------------------------------------------------

class Recorder:
    """Every request of the run, in memory (a 10-minute soak at ~20 req/s is ~12,000 small tuples)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.samples: list[Sample] = []

    def reset(self) -> None:
        self.started, self.samples = time.time(), []


RECORD = Recorder()
# Set by the scenario module: its name and how its run is cut into windows for `<prefix>_windows.csv`.
SCENARIO: dict = {"name": "steady", "windows": None, "extra": None}


@events.test_start.add_listener
def _started(environment, **_kwargs) -> None:
    RECORD.reset()


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, context=None, start_time=None,
            **_kwargs) -> None:
    if not context or "kind" not in context or RECORD.started is None:
        return
    started = start_time if start_time is not None else time.time() - response_time / 1000
    outcome = "failed" if exception is not None else context.get("outcome", "ok")
    RECORD.samples.append(Sample(started - RECORD.started, started + response_time / 1000 - RECORD.started,
                                 context["kind"], outcome, context.get("users", 0)))


# --- the user ---------------------------------------------------------------------------------------------

_USER_NUMBERS = itertools.count()


class TriageUser(FastHttpUser):
    """A PACS router posting films for triage, one request after another (the scenario sets the pacing)."""

    abstract = True
    network_timeout = 300.0  # the service's own request timeout (traffic.timeout)
    connection_timeout = 30.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.corpus = corpus_at(options.corpus)
        self.rng = random.Random(f"{options.mix_seed}:{next(_USER_NUMBERS)}")
        self.retry_after_cap = options.retry_after_cap
        self.mix = parse_mix(options.mix)

    @task
    def triage(self) -> None:
        film, payload, mask = pick(self.rng, self.corpus, self.mix)
        name = f"reject {film.code}" if film.kind == "reject" else f"{film.kind} mask={mask}"
        context = {"kind": film.kind, "users": self.environment.runner.user_count}
        wait = 0.0
        with self.client.post(f"/v1/triage?mask={mask}", data=payload, headers=HEADERS, name=name,
                              catch_response=True, context=context) as response:
            try:
                body = response.json()
            except Exception:  # noqa: BLE001 -- any undecodable body is judged below as "not JSON"
                body = response.text
            error_code = body.get("error", {}).get("code") if isinstance(body, dict) and \
                isinstance(body.get("error"), dict) else None
            retry_after = response.headers.get("Retry-After") if response.headers else None
            if response.status_code == 503 and error_code == "overloaded" and retry_after:
                # Shedding: counted apart (its own row in Locust's table), and the user backs off.
                response.request_meta["name"] = SHED  # the meta Locust reports when the block ends
                response.request_meta["context"]["outcome"] = "shed"
                response.success()
                wait = min(float(retry_after), self.retry_after_cap)
            else:
                problem = expectation_problem(film, response.status_code, body)
                if problem:
                    response.failure(problem)
                else:
                    response.success()
        if wait:
            time.sleep(wait)  # gevent-patched: only this user waits


# --- the summary ------------------------------------------------------------------------------------------

@events.test_stop.add_listener
def _report(environment, **_kwargs) -> None:
    if RECORD.started is None:
        return
    options = environment.parsed_options
    samples = list(RECORD.samples)
    length = max((s.end for s in samples), default=0.0)
    windows_of = SCENARIO["windows"] or equal_windows()
    windows = [{"window": label, "start_s": round(a, 2), "end_s": round(b, 2), **summarise(samples, a, b)}
               for label, a, b in windows_of(length)]
    row = {"scenario": SCENARIO["name"],
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(RECORD.started)),
           "warmup_s": options.summary_warmup, "mix": options.mix,
           **summarise(samples, options.summary_warmup, math.inf)}
    if SCENARIO["extra"]:
        row.update(SCENARIO["extra"](samples, windows))
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        write_row(Path(f"{prefix}_summary.csv"), row)
        write_rows(Path(f"{prefix}_windows.csv"), windows)
    print("SUMMARY " + " ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    RECORD.started = None  # test_stop can fire twice (stop, then quit): report once
