"""A flood beyond capacity against a running service: does it shed load fast, keep admitted films fast, recover?

    python -m load_tests.overload --host http://127.0.0.1:3000 --film ../shared/realdata/chest/siim_cr_jpegbaseline_mono2.dcm \\
        --clients 32 --seconds 20

Each client posts the film again as soon as it has an answer -- after a 503 it waits `--pause` seconds,
ignoring Retry-After (a flood, not a polite client; 0 = hostile, hammering) -- for `--seconds`. Then one client posts until it gets a 200: the time from the end of the flood to
that 200 is the recovery time. Reported: admitted throughput (200s per second during the flood), share of
503s, p50/p99 latency of admitted requests against the single-request latency measured first, p99 of the
refusals (they must be fast: the point of admission control), and the recovery time.
`tests/http/test_app_overload.py` runs the same flood through a real server with a small PTX_MAX_IN_FLIGHT.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Answer:
    started: float
    seconds: float
    status: int
    retry_after: str | None


@dataclass(frozen=True)
class FloodReport:
    clients: int
    pause_s: float  # wait after a 503 before trying again
    seconds: float
    single_ms: float  # one film alone, median of a few
    answers: tuple[Answer, ...]
    recovery_s: float  # end of the flood → first 200

    def of(self, status: int) -> list[Answer]:
        return [answer for answer in self.answers if answer.status == status]

    @property
    def admitted_per_s(self) -> float:
        return len(self.of(200)) / self.seconds

    @property
    def refused_share(self) -> float:
        return len(self.of(503)) / max(1, len(self.answers))

    def percentile_ms(self, status: int, q: float) -> float:
        values = [answer.seconds for answer in self.of(status)]
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    def table(self) -> str:
        others = sorted({a.status for a in self.answers} - {200, 503})
        rows = [
            ("clients (Retry-After ignored)", f"{self.clients}, {self.pause_s * 1e3:.0f} ms pause after a 503"),
            ("flood duration", f"{self.seconds:.0f} s"),
            ("requests answered", f"{len(self.answers)}"),
            ("single-request latency (alone, median)", f"{self.single_ms:.0f} ms"),
            ("admitted throughput", f"{self.admitted_per_s:.1f} films/s"),
            ("503 share", f"{100 * self.refused_share:.1f} %"),
            ("admitted p50 / p99", f"{self.percentile_ms(200, 50):.0f} / {self.percentile_ms(200, 99):.0f} ms"
                                   f" ({self.percentile_ms(200, 99) / self.single_ms:.1f}× single)"),
            ("503 p50 / p99", f"{self.percentile_ms(503, 50):.1f} / {self.percentile_ms(503, 99):.1f} ms"),
            ("other statuses", ", ".join(f"{s}×{len(self.of(s))}" for s in others) or "none"),
            ("recovery (flood end → first 200)", f"{self.recovery_s * 1e3:.0f} ms"),
        ]
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


class Poster:
    """One keep-alive connection posting DICOM bodies."""

    def __init__(self, base: str, path: str, timeout_s: float = 120) -> None:
        url = urllib.parse.urlsplit(base)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
        self.path = path

    def post(self, body: bytes) -> tuple[int, str | None]:
        try:
            self.connection.request("POST", self.path, body=body, headers={"Content-Type": "application/dicom"})
            response = self.connection.getresponse()
            response.read()
            return response.status, response.getheader("Retry-After")
        except (OSError, http.client.HTTPException):
            self.connection.close()  # reconnects on the next request
            return 0, None


def single_latency_ms(base: str, body: bytes, path: str, count: int = 5) -> float:
    poster = Poster(base, path)
    poster.post(body)  # warm the connection and the caches
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, _ = poster.post(body)
        if status != 200:
            raise RuntimeError(f"a single film was answered {status}; is the service ready?")
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def flood(base: str, body: bytes, clients: int, seconds: float, pause_s: float = 0.0,
          path: str = "/v1/triage?mask=none") -> FloodReport:
    single_ms = single_latency_ms(base, body, path)
    answers: list[Answer] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    origin = time.perf_counter()

    def client() -> None:
        poster = Poster(base, path)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            status, retry_after = poster.post(body)
            answer = Answer(started - origin, time.perf_counter() - started, status, retry_after)
            with lock:
                answers.append(answer)
            if status == 503 and pause_s:
                time.sleep(pause_s)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flood_end = time.perf_counter()
    # Answers that came back after the deadline still count (they were admitted during the flood); the
    # flood's duration is until the last of them, so admitted throughput is not inflated.
    duration = flood_end - origin
    poster = Poster(base, path)
    while poster.post(body)[0] != 200:
        time.sleep(0.05)
    return FloodReport(clients, pause_s, duration, single_ms, tuple(answers), time.perf_counter() - flood_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="base URL of a running service")
    parser.add_argument("--film", type=Path, required=True, help="a DICOM file the service accepts")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds a client waits after a 503")
    parser.add_argument("--append", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    report = flood(args.host, args.film.read_bytes(), args.clients, args.seconds, args.pause)
    print(report.table())
    if args.append:
        with args.append.open("a", encoding="utf-8") as handle:
            handle.write(f"\n{report.table()}\n")


if __name__ == "__main__":
    main()
