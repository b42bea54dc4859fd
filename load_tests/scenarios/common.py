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

import csv
import functools
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locust import FastHttpUser, events, task

from load_tests.corpus import DEFAULT_DIR, Corpus, Film, load, pick

HEADERS = {"Content-Type": "application/dicom"}
SHED = "shed 503"
FILM_KINDS = ("positive", "negative")


# --- options ----------------------------------------------------------------------------------------------

@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("ptx-triage scenarios")
    group.add_argument("--corpus", default=str(DEFAULT_DIR), env_var="PTX_LOAD_CORPUS",
                       help="corpus folder built by `python -m load_tests.corpus` (default %(default)s)")
    group.add_argument("--mix-seed", type=int, default=0, help="seed of the users' request draws")
    group.add_argument("--summary-warmup", type=float, default=0.0,
                       help="seconds at the start left out of the summary row (not of the windows)")
    group.add_argument("--retry-after-cap", type=float, default=5.0,
                       help="longest wait after a 503 whatever its Retry-After says")


@functools.cache
def corpus_at(folder: str) -> Corpus:
    return load(Path(folder))


# --- the record -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One request as the summary sees it; times in seconds since the test started."""

    start: float
    end: float
    kind: str  # positive, negative, reject
    outcome: str  # ok, shed, failed
    users: int  # users running when it was sent


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


def expectation_problem(film: Film, status: int, body: object) -> str | None:
    """Why an answer (not a 503) is not what the corpus expects for `film`; None when it is."""
    if status != film.status:
        return f"expected {film.status}, got {status}: {str(body)[:200]}"
    if not isinstance(body, dict):
        return f"{status} with a body that is not a JSON object"
    if film.code is not None:
        code = (body.get("error") or {}).get("code") if isinstance(body.get("error"), dict) else None
        return None if code == film.code else f"expected error code {film.code}, got {code}"
    score = body.get("score")
    if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        return f"200 without a score in [0, 1]: {score!r}"
    if body.get("label") != film.label:
        return f"{film.path}: expected label {film.label} (corpus score {film.score:.4f}), got {body.get('label')} " \
               f"(score {score:.4f})"
    return None


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

    @task
    def triage(self) -> None:
        film, payload, mask = pick(self.rng, self.corpus)
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

def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarise(samples: Sequence[Sample], start: float, end: float) -> dict:
    """Figures for the requests that started in [start, end) s: counts by outcome, the 503 share of all
    requests, latency percentiles (ms) and throughput of triaged films (200 for a positive or negative
    film), and the share of answered requests that were positive films."""
    chosen = [s for s in samples if start <= s.start < end]
    triaged = [s for s in chosen if s.kind in FILM_KINDS and s.outcome == "ok"]
    latencies = [(s.end - s.start) * 1000 for s in triaged]
    shed = sum(s.outcome == "shed" for s in chosen)
    failures = sum(s.outcome == "failed" for s in chosen)
    answered = len(chosen) - shed
    last_end = max((s.end for s in chosen), default=start)
    duration = max(min(end, last_end) - start, 1e-9) if chosen else 0.0
    return {
        "requests": len(chosen), "failures": failures, "shed_503": shed,
        "shed_share": round(shed / len(chosen), 4) if chosen else 0.0,
        "triaged": len(triaged),
        "positives": sum(s.kind == "positive" and s.outcome == "ok" for s in chosen),
        "rejects_ok": sum(s.kind == "reject" and s.outcome == "ok" for s in chosen),
        "positive_share": round(sum(s.kind == "positive" for s in chosen if s.outcome != "shed") / answered, 4)
        if answered else math.nan,
        "p50_ms": round(_percentile(latencies, 50), 1), "p95_ms": round(_percentile(latencies, 95), 1),
        "p99_ms": round(_percentile(latencies, 99), 1),
        "duration_s": round(duration, 2),
        "throughput_films_s": round(len(triaged) / duration, 3) if duration else 0.0,
        "requests_s": round(len(chosen) / duration, 3) if duration else 0.0,
        "users_max": max((s.users for s in chosen), default=0),
    }


def equal_windows(count: int = 10) -> Callable[[float], list[tuple[str, float, float]]]:
    """Windows for a run of `length` s: `count` equal slices."""
    def windows(length: float) -> list[tuple[str, float, float]]:
        step = length / count
        digits = 0 if step >= 10 else 1
        return [(f"{i * step:.{digits}f}-{(i + 1) * step:.{digits}f}s", i * step, (i + 1) * step)
                for i in range(count)]
    return windows


def write_row(path: Path, row: dict) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["window"])
        writer.writeheader()
        writer.writerows(rows)


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
           "warmup_s": options.summary_warmup,
           **summarise(samples, options.summary_warmup, math.inf)}
    if SCENARIO["extra"]:
        row.update(SCENARIO["extra"](samples, windows))
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        write_row(Path(f"{prefix}_summary.csv"), row)
        write_rows(Path(f"{prefix}_windows.csv"), windows)
    print("SUMMARY " + " ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    RECORD.started = None  # test_stop can fire twice (stop, then quit): report once
