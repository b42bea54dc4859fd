"""The numbers of a scenario run, from its record of requests: pure functions, no Locust (importing
Locust monkey-patches the process with gevent, which tests and tools that only compute must not get)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from load_tests.corpus import Film

FILM_KINDS = ("positive", "negative")


@dataclass(frozen=True)
class Sample:
    """One request as the summary sees it; times in seconds since the test started."""

    start: float
    end: float
    kind: str  # positive, negative, reject
    outcome: str  # ok, shed, failed
    users: int  # users running when it was sent


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
