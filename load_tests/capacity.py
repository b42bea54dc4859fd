"""Capacity report: the steady mix at increasing concurrency until p99 crosses its bound (issue #6 §3).

    python -m load_tests.capacity [--append docs/benchmarks.md] [--note TEXT] [--host URL]
        [--users 1,2,4,8,16,32,64] [--step-s 30] [--warmup-s 5] [--half-s 60]
        [--p99-bound-ms 2000] [--service-env KEY=VALUE ...] [--corpus DIR] [--out DIR]

Without --host it starts the service (`bentoml serve` from the repository root, its defaults plus
--service-env, data under --out) and stops it by process group at the end. Every measurement is the steady
or soak Locust scenario (`load_tests/scenarios/`) run as a subprocess against it, with the corpus mix
(22 % positive films, 75 % negative, 3 % rejects; lossless compressed syntaxes and uncompressed; see
`load_tests/corpus.py`), and read back from the scenario's `_summary.csv`:

1. **the ladder**: the steady scenario (closed loop, no think time) at each user count of --users for
   --step-s, the first --warmup-s of each step left out; it stops after the first step whose p99 passes
   --p99-bound-ms, or that has failures or 503s (the service shedding). The first step is one user,
   requests one after another: its median (p50) latency of triaged films is "the single-request
   latency" L1.
2. **half of saturation**: the saturation throughput X_sat is the highest throughput of the ladder, the
   saturation point the fewest users that reach 95 % of it (throughput stops growing there). The soak
   scenario (paced users: an offered rate independent of latency) then offers 0.5 x X_sat for --half-s,
   with enough users that each waits most of its pacing interval, started evenly over one interval so
   that their requests do not arrive together, and its p99 is compared with L1:
   the compass wants p99 at 50 % of saturation <= 4 x L1.

The sustainable throughput is the highest ladder throughput with p99 <= the bound and no failure or 503.
Throughput counts triaged films (200 for a film; rejects and 503s are not films). The client runs on the
same cores as the service: its CPU time per step is in the table. The Markdown report (printed, written to
--out, and with --append added to its section of docs/benchmarks.md) carries the command, date, machine,
load average and settings. With the defaults the run takes at most about 5.5 minutes of load, plus the
server start-up (about 30 s on a quiet 2-core box) and the corpus (about 30 s, once).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import resource
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "load_tests" / "scenarios"
SECTION = "## Load scenarios and capacity (issue #6)"
SATURATION_SHARE = 0.95  # the saturation point: the fewest users reaching this share of the top throughput
COMPASS_RATIO = 4.0  # p99 at half of saturation over the single-request latency


@dataclass
class Step:
    """One Locust run: what it was asked and its summary row (numbers parsed)."""

    label: str
    users: int
    pace_s: float | None  # None: closed loop, no think time
    summary: dict
    client_cpu_s: float

    @property
    def throughput(self) -> float:
        return float(self.summary["throughput_films_s"])

    @property
    def p99_ms(self) -> float:
        return float(self.summary["p99_ms"])

    @property
    def clean(self) -> bool:
        return int(self.summary["failures"]) == 0 and int(self.summary["shed_503"]) == 0


def _number(value: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_summary(prefix: Path) -> dict:
    with Path(f"{prefix}_summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != 1:
        raise RuntimeError(f"{prefix}_summary.csv: expected one row, found {len(rows)}")
    return {key: _number(value) for key, value in rows[0].items()}


def run_scenario(scenario: str, base: str, users: int, seconds: float, warmup_s: float, corpus: Path,
                 prefix: Path, extra: list[str] | None = None, spawn_rate: float | None = None) -> tuple[dict, float]:
    """One headless Locust run as a subprocess (users started within a second unless `spawn_rate` says
    otherwise); its summary row and the CPU seconds the client used."""
    command = [sys.executable, "-m", "locust", "-f", str(SCENARIOS / f"{scenario}.py"), "--headless",
               "--host", base, "-u", str(users), "-r", f"{spawn_rate or users:g}", "-t", f"{seconds:g}s",
               "--csv", str(prefix),
               "--only-summary", "--summary-warmup", f"{warmup_s:g}", "--corpus", str(corpus),
               "--stop-timeout", "0", "--exit-code-on-error", "0", *(extra or [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Path(f"{prefix}.log").open("wb") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 180)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"locust exited with {result.returncode}; see {prefix}.log")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return read_summary(prefix), cpu


# --- the analysis (pure) ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Analysis:
    single_ms: float  # L1: median latency at one user, sequential
    single_p99_ms: float  # the same step's p99: the films' own spread (encodings, sizes), before any queueing
    sustainable: Step | None  # highest throughput with p99 <= bound and no failure or 503
    saturation: Step  # fewest users reaching SATURATION_SHARE of the top throughput
    top_throughput: float  # X_sat
    crossed: Step | None  # the step whose p99 passed the bound (None: the ladder ended first)


def analyse(ladder: list[Step], bound_ms: float) -> Analysis:
    """The report's figures from the ladder, whose first step must be one user (it gives L1)."""
    if not ladder or ladder[0].users != 1:
        raise ValueError("the ladder must start with one user: its median latency is the single-request latency")
    single = ladder[0]
    top = max(step.throughput for step in ladder)
    saturation = next(step for step in ladder if step.throughput >= SATURATION_SHARE * top)
    within = [step for step in ladder if step.clean and step.p99_ms <= bound_ms]
    sustainable = max(within, key=lambda step: step.throughput) if within else None
    crossed = next((step for step in ladder if step.p99_ms > bound_ms), None)
    return Analysis(float(single.summary["p50_ms"]), single.p99_ms, sustainable, saturation, top, crossed)


def half_load_plan(top_throughput: float, single_s: float, idle_factor: float = 4.0) -> tuple[int, float]:
    """(users, pace in s) offering 0.5 x `top_throughput` requests per second, each user idle most of its
    interval: the interval is at least `idle_factor` x the single-request latency (and at least 1 s), so a
    slower answer rarely delays the next request and the offered rate stays what was asked."""
    rate = 0.5 * top_throughput
    if rate <= 0:
        raise ValueError("the ladder measured no throughput")
    interval = max(1.0, idle_factor * single_s)
    users = max(1, math.ceil(rate * interval))
    return users, users / rate


def stop_reason(step: Step, bound_ms: float) -> str | None:
    """Why the ladder stops after `step`, or None to go on."""
    if step.p99_ms > bound_ms or math.isnan(step.p99_ms):
        return f"p99 {step.p99_ms:,.0f} ms > bound {bound_ms:,.0f} ms"
    if int(step.summary["failures"]):
        return f"{step.summary['failures']} failed requests"
    if int(step.summary["shed_503"]):
        return f"{step.summary['shed_503']} requests shed with 503"
    return None


# --- the report -------------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return "–" if value != value else f"{value:,.0f}"


def _users(n: int) -> str:
    return f"{n} user" + ("" if n == 1 else "s")


def markdown(command: str, started: dt.datetime, setting: str, steps: list[Step], analysis: Analysis,
             half: Step | None, bound_ms: float, stopped: str, note: str | None) -> str:
    ratio = float(half.summary["p99_ms"]) / analysis.single_ms if half else math.nan
    title = f"### {started:%Y-%m-%d}: capacity, steady mix" + (f" — {note}" if note else "")
    lines = [title, "", f"`{command}`", "", setting, "",
             "| step | users | pacing | films/s | req/s | p50 | p95 | p99 | 503 share | failures | client CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for step in steps:
        s = step.summary
        lines.append(f"| {step.label} | {step.users} | {f'{step.pace_s:.2f} s' if step.pace_s else 'none'} | "
                     f"{s['throughput_films_s']:.2f} | {s['requests_s']:.2f} | {_ms(s['p50_ms'])} ms | "
                     f"{_ms(s['p95_ms'])} ms | {_ms(s['p99_ms'])} ms | {100 * s['shed_share']:.1f} % | "
                     f"{s['failures']} | {step.client_cpu_s:.0f} s |")
    sustainable = analysis.sustainable
    lines += [
        "",
        f"- **Single-request latency** (the 1-user step, sequential, median of triaged films): "
        f"**{_ms(analysis.single_ms)} ms**.",
        f"- **Sustainable throughput** (highest with p99 ≤ {_ms(bound_ms)} ms, no failure, no 503): "
        + (f"**{sustainable.throughput:.2f} films/s** at {_users(sustainable.users)} (p99 {_ms(sustainable.p99_ms)} ms)."
           if sustainable else "none: the first step already failed the bound."),
        f"- **Saturation point**: throughput stops growing at **{_users(analysis.saturation.users)}, "
        f"{analysis.saturation.throughput:.2f} films/s** (the fewest users reaching "
        f"{SATURATION_SHARE:.0%} of the top, {analysis.top_throughput:.2f} films/s). Ladder stopped: {stopped}.",
    ]
    if half is not None:
        verdict = "meets" if ratio <= COMPASS_RATIO else "does not meet"
        lines.append(
            f"- **p99 at 50 % of saturation** ({0.5 * analysis.top_throughput:.2f} films/s offered by {half.users} "
            f"paced users, {half.summary['throughput_films_s']:.2f} films/s served): **{_ms(half.p99_ms)} ms = "
            f"{ratio:.1f}× the single-request latency**; the compass wants ≤ {COMPASS_RATIO:.0f}×: this run "
            f"{verdict} it."
            + ("" if half.clean else f" (That run had {half.summary['failures']} failures and "
                                     f"{half.summary['shed_503']} 503s: the offered rate was not all served.)"))
        lines.append(
            f"- For scale: the 1-user step's own p99 is {_ms(analysis.single_p99_ms)} ms "
            f"({analysis.single_p99_ms / analysis.single_ms:.1f}× its median: the mix's films differ, JPEG 2000 "
            f"costs most to decode), so p99 at 50 % of saturation is "
            f"{half.p99_ms / analysis.single_p99_ms:.1f}× the single-request p99.")
    return "\n".join(lines) + "\n"


def append_to_section(document: str, text: str) -> str:
    """`document` with `text` at the end of the capacity section (before the next `## ` heading); the
    section is added at the end of the document if it is not there."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == SECTION), None)
    if start is None:
        return document.rstrip("\n") + f"\n\n{SECTION}\n\n{text.rstrip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = "".join(lines[start:end]).rstrip("\n") + "\n\n" + text.rstrip() + "\n"
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + rest if rest else "")


# --- the run ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from load_tests import corpus as corpus_module
    from load_tests.bench_service import machine

    parser = argparse.ArgumentParser(prog="python -m load_tests.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="target a running service (base URL) instead of starting one")
    parser.add_argument("--users", default="1,2,4,8,16,32,64", help="the ladder (comma-separated user counts)")
    parser.add_argument("--step-s", type=float, default=30.0, help="seconds per ladder step")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds left out at the start of each run")
    parser.add_argument("--half-s", type=float, default=60.0, help="seconds of the run at 50 %% of saturation")
    parser.add_argument("--p99-bound-ms", type=float, default=2000.0)
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the started service (and of the corpus scoring); repeatable")
    parser.add_argument("--corpus", type=Path, default=corpus_module.DEFAULT_DIR)
    parser.add_argument("--out", type=Path, help="default data/load/capacity/<time>")
    parser.add_argument("--append", type=Path, help="add the report to this document's capacity section")
    parser.add_argument("--note", help="appended to the report's heading (e.g. 'PROVISIONAL, shared box')")
    args = parser.parse_args(argv)
    users = [int(value) for value in args.users.split(",")]
    if users[0] != 1 or users != sorted(set(users)):
        parser.error("--users must be increasing and start with 1 (the single-request latency)")
    service_env = dict(item.split("=", 1) for item in args.service_env)
    os.environ.update(service_env)  # the corpus is scored with the models and TTA the service will use
    started = dt.datetime.now(dt.timezone.utc)
    out = args.out or REPO / "data" / "load" / "capacity" / started.strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    estimate = len(users) * args.step_s + args.half_s + 4 * (len(users) + 2)
    print(f"capacity run: at most ~{estimate / 60:.1f} min of load (server start-up aside); output in {out}",
          flush=True)
    manifest = corpus_module.ensure(args.corpus)
    print(f"corpus {args.corpus}: {manifest['pools']}", flush=True)

    import contextlib

    from tests.servers import bento_server

    server = contextlib.nullcontext(args.host.rstrip("/")) if args.host else bento_server(
        out / "server.log", env={"PTX_DATA_DIR": str(out / "service-data"), **service_env}, timeout_s=300)
    load_before = os.getloadavg()[0]
    steps: list[Step] = []
    with server as base:
        def measure(label: str, scenario: str, n: int, seconds: float, pace: float | None = None) -> Step:
            extra = ["--pace-s", f"{pace:.4f}"] if pace else []
            rate = n / pace if pace else None  # paced users start evenly over one interval
            warmup = max(args.warmup_s, pace or 0.0)
            summary, cpu = run_scenario(scenario, base, n, seconds, warmup, args.corpus,
                                        out / label.replace(" ", "-"), extra, rate)
            step = Step(label, n, pace, summary, cpu)
            print(f"{label}: {n} users, {summary['throughput_films_s']:.2f} films/s, p50 {_ms(summary['p50_ms'])} ms, "
                  f"p99 {_ms(summary['p99_ms'])} ms, 503 {summary['shed_503']}, failures {summary['failures']}, "
                  f"client CPU {cpu:.0f} s", flush=True)
            steps.append(step)
            return step

        ladder: list[Step] = []
        stopped = "end of the ladder"
        for n in users:
            ladder.append(measure(f"steady u{n}", "steady", n, args.step_s))
            reason = stop_reason(ladder[-1], args.p99_bound_ms)
            if reason:
                stopped = f"{reason} at {_users(n)}"
                break
        analysis = analyse(ladder, args.p99_bound_ms)
        half_users, pace = half_load_plan(analysis.top_throughput, analysis.single_ms / 1000)
        half = measure("half saturation", "soak", half_users, args.half_s, pace)

    setting = (f"Machine: {machine()}; load average {load_before:.2f} before the run. Service: "
               + (f"`{args.host}` (not started by the tool)" if args.host else
                  f"`bentoml serve`, defaults + {service_env or 'nothing'}")
               + f". Corpus: `{args.corpus.relative_to(REPO) if args.corpus.is_relative_to(REPO) else args.corpus}`"
               f" ({manifest['pools']}, seed {manifest['options']['seed']}), mix {manifest['mix']}, masks "
               f"{manifest['masks']}. Steps of {args.step_s:g} s (first {args.warmup_s:g} s left out), "
               f"half-saturation run {args.half_s:g} s; p99 bound {args.p99_bound_ms:g} ms. "
               f"Latencies are client-side, over triaged films.")
    command = "python -m load_tests.capacity " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = markdown(command.strip(), started, setting, steps, analysis, half, args.p99_bound_ms, stopped, args.note)
    (out / "report.md").write_text(report)
    print("\n" + report)
    if args.append:
        args.append.write_text(append_to_section(args.append.read_text(), report))
        print(f"added to {args.append}, section {SECTION!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
