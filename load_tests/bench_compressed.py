"""Compressed films through three servers in one run: naive, service with reduced decoding off, and on (issue 15 §4).

    python -m load_tests.bench_compressed [--synthetic 30] [--real-repeat 8] [--concurrency 4 16] [--seed 0]
        [--rounds 1] [--interleave] [--mask rle] [--service-env KEY=VALUE ...] [--out DIR] [--append FILE]

Why a run of its own: `bench_service` measures uncompressed films, where decoding costs a few milliseconds and
`PTX_REDUCED_DECODE` changes nothing. Issue 15's bar is about the films hospitals send compressed: the service
must answer the JPEG 2000 films at least 5x faster per film with reduced decoding on than with it off, measured
in the same run on the same films and concurrency, so that the box's load moves both sides alike.

The films, in four groups, each posted as its own pass (so a group's films/s is its own):

* the real JPEG 2000 and JPEG chest films of ../shared/realdata/chest (read there, never copied), each posted
  `--real-repeat` times under a name of its own (`<file>#<n>`);
* `--synthetic` uncompressed 1024² `training synth` films (bench_service's cache), re-encoded as JPEG 2000
  lossless and as JPEG 2000 lossy 20:1 (bench_reduced_decode's `as_j2k`), cached beside them.

The servers, started in turn, each alone on the CPU: `load_tests/naive_server.py` (full decode, PyTorch eager,
one request at a time), `bentoml serve` with PTX_REDUCED_DECODE=false, then with it true (the default). Each
gets a warm-up of 2·C films from every group, then every group at every concurrency, `--rounds` times. On a
box shared with other work, whose load drifts within minutes, `--interleave` starts the three at once and
alternates their passes (an idle server costs next to nothing), so the drift falls on all three alike; on
such a box only the ratios mean anything. Reported per group: films/s and latency (mean, p50, p99) per server,
the server's own mean decode time, the ratios (reduced on vs off, and the service vs the naive server), and the
largest score difference on vs off. Checks (exit status 1): every answer is 200, and the service with reduced
decoding off answers the naive server's scores (both decode in full).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit

from load_tests.bench_reduced_decode import as_j2k
from load_tests.bench_service import (
    REPO,
    LoadSummary,
    Phase,
    agreement,
    append_to_section,
    drive,
    machine,
    naive_server,
    parse_env,
    summarise,
    synthetic_films,
)

REAL_J2K, REAL_JPEG = "real JPEG 2000", "real JPEG"
SYNTH_LOSSLESS, SYNTH_LOSSY = "synthetic JPEG 2000 lossless", "synthetic JPEG 2000 lossy 20:1"
GROUPS = (REAL_J2K, REAL_JPEG, SYNTH_LOSSLESS, SYNTH_LOSSY)
J2K_GROUPS = (REAL_J2K, SYNTH_LOSSLESS, SYNTH_LOSSY)  # the issue's bar: "the JPEG 2000 films"
ALL_J2K = "all JPEG 2000"
SERVERS = ("naive", "reduced off", "reduced on")
BAR = 5.0  # issue 15: JPEG 2000 films >= 5x faster per film with reduced decoding on than off
SECTION = "## Service vs the naive server after issue 15 (issue 15 §4)"
PLACEHOLDER = "Not run yet: the compressed-corpus comparison."


@dataclass(frozen=True)
class CorpusFilm:
    name: str  # unique in the corpus: the answers are keyed by it
    group: str
    data: bytes


# --- the films --------------------------------------------------------------------------------------------

def real_group(path: Path) -> str | None:
    """The group of a real film by its transfer syntax; None for an encoding this benchmark is not about."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax in (JPEG2000, JPEG2000Lossless):
        return REAL_J2K
    if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return REAL_JPEG
    return None


def real_corpus(chest: Path, repeat: int) -> list[CorpusFilm]:
    """Every JPEG 2000 and JPEG film in `chest`, `repeat` times each (four real films are too few for a pass),
    the films in turn within each round, so that any first films of a group hold each of its files."""
    if not chest.is_dir():
        raise SystemExit(f"real chest films not found at {chest}: set PTX_REALDATA, or pass --real-repeat 0")
    found = [(path, real_group(path)) for path in sorted(chest.glob("*.dcm"))]
    files = [(path.stem, group, path.read_bytes()) for path, group in found if group is not None]
    return [CorpusFilm(f"{stem}#{n}", group, data) for n in range(repeat) for stem, group, data in files]


def synthetic_corpus(count: int, seed: int, root: Path) -> list[CorpusFilm]:
    """`count` uncompressed synthetic films re-encoded as JPEG 2000 lossless and lossy, encoded once and cached."""
    if count == 0:
        return []
    films, sources = [], synthetic_films(count, seed, root)
    folder = root / f"compressed-n{count}-s{seed}"
    for group, lossy, sub in ((SYNTH_LOSSLESS, False, "j2k-lossless"), (SYNTH_LOSSY, True, "j2k-lossy")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for source in sources:
            target = folder / sub / source.name
            if not target.is_file():
                target.write_bytes(as_j2k(source.read_bytes(), lossy=lossy))
            films.append(CorpusFilm(f"{sub}/{source.stem}", group, target.read_bytes()))
    return films


def by_group(films: Sequence[CorpusFilm]) -> dict[str, list[tuple[str, bytes]]]:
    """The corpus as bench_service's (name, bytes) lists, per group in GROUPS order; empty groups left out."""
    groups: dict[str, list[tuple[str, bytes]]] = {group: [] for group in GROUPS}
    for film in films:
        groups[film.group].append((film.name, film.data))
    return {group: found for group, found in groups.items() if found}


def warmup_films(groups: dict[str, list[tuple[str, bytes]]], count: int) -> list[tuple[str, bytes]]:
    """`count` films taken from every group in turn, so each decoder (and each decode worker) is warm."""
    lists = list(groups.values())
    return [lists[i % len(lists)][(i // len(lists)) % len(lists[i % len(lists)])] for i in range(count)]


# --- the figures ------------------------------------------------------------------------------------------

def pooled(phases: Sequence[Phase]) -> LoadSummary:
    """One summary of several passes: all their successful latencies, their errors, their walls added."""
    latencies = [value for phase in phases for value in phase.latencies_s.values()]
    return summarise(latencies, sum(p.summary.errors for p in phases), sum(p.summary.wall_s for p in phases))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def group_row(phases: dict[str, Sequence[Phase]]) -> dict:
    """Figures of one group (or of several pooled) on the three servers, with the ratios and the agreement."""
    summaries = {server: pooled(phases[server]) for server in SERVERS}
    answers = {server: {k: v for p in phases[server] for k, v in p.answers.items()} for server in SERVERS}
    decode = {}
    for server in SERVERS:
        values = [float(body["timings_ms"]["decode"]) for body in answers[server].values()
                  if "decode" in (body.get("timings_ms") or {})]
        decode[server] = sum(values) / len(values) if values else float("nan")
    off, on, naive = (summaries[s] for s in ("reduced off", "reduced on", "naive"))
    return {
        "films": on.requests,
        "servers": {server: asdict(summary) for server, summary in summaries.items()},
        "decode_ms": decode,
        "on_vs_off_throughput": _ratio(on.throughput, off.throughput),
        "on_vs_off_mean_latency": _ratio(off.mean_ms, on.mean_ms),
        "on_vs_naive_throughput": _ratio(on.throughput, naive.throughput),
        "on_vs_off": asdict(agreement(answers["reduced off"], answers["reduced on"])),
        "off_vs_naive": asdict(agreement(answers["naive"], answers["reduced off"])),
    }


def _latency(summary: dict) -> str:
    return f"{summary['mean_ms']:,.0f} / {summary['p50_ms']:,.0f} / {summary['p99_ms']:,.0f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"### {report['date']}: compressed films, reduced decoding off vs on, and the naive server",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average before the passes "
        f"{report['load'][0]:.1f}–{report['load'][1]:.1f}. "
        f"Models {report['models']}, hflip TTA {'on' if s['hflip_tta'] else 'off'}, mask={s['mask']}, service env "
        f"{s['service_env'] or '{}'}, warm-up {s['warmup']} films per server; "
        + ("the three servers up at once, passes alternated, " if s.get("interleave") else "servers in turn, ")
        + f"{s.get('rounds', 1)} pass(es) of each group per server and concurrency, pooled. Films: "
        + ", ".join(f"{group} {n}" for group, n in report["films"].items()) + ".",
    ]
    for concurrency, rows in report["tables"].items():
        lines += [
            "",
            (f"Concurrency {concurrency}. Latency: mean / p50 / p99 ms; decode: the server's own mean `timings_ms` "
            "decode, off → on."),
            "",
            ("| films | n | naive films/s | naive latency | off films/s | off latency | on films/s | on latency "
            "| decode ms off → on | on vs off, films/s | on vs off, mean latency | on vs naive, films/s "
            "| max \\|Δscore\\| on vs off |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for group, row in rows.items():
            servers = row["servers"]
            name = f"**{group}**" if group == ALL_J2K else group
            lines.append(
                f"| {name} | {row['films']} | {servers['naive']['throughput']:.2f} | {_latency(servers['naive'])} "
                f"| {servers['reduced off']['throughput']:.2f} | {_latency(servers['reduced off'])} "
                f"| {servers['reduced on']['throughput']:.2f} | {_latency(servers['reduced on'])} "
                f"| {row['decode_ms']['reduced off']:.0f} → {row['decode_ms']['reduced on']:.0f} "
                f"| **{row['on_vs_off_throughput']:.2f}×** | {row['on_vs_off_mean_latency']:.2f}× "
                f"| {row['on_vs_naive_throughput']:.2f}× | {row['on_vs_off']['max_abs_score_difference']:.4f} |")
        bar = rows[ALL_J2K]["on_vs_off_throughput"] if ALL_J2K in rows else float("nan")
        lines += ["", (f"Issue 15's bar (JPEG 2000 films ≥ {BAR:.0f}× faster per film, reduced decoding on vs off, "
                      f"films/s): {bar:.2f}×, {'met' if bar >= BAR else 'NOT met'} at concurrency {concurrency}.")]
    lines += ["", ("Reduced off vs the naive server (both decode in full): max |Δscore| "
              f"{report['off_vs_naive_max']:.1e}.")]
    return "\n".join(lines) + "\n"


# --- the run ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(server: str, out: Path, env: dict[str, str], models, threads: int, timeout_s: float) -> Iterator[str]:
    """One of the three servers, each with a data folder of its own under `out`."""
    from tests.servers import bento_server

    if server == "naive":
        with naive_server(out / "naive.log", env, models.classifier.directory, models.segmenter.directory, threads,
                          timeout_s) as base:
            yield base
        return
    slug = server.replace(" ", "-")
    own = {**env, "PTX_REDUCED_DECODE": str(server == "reduced on").lower(), "PTX_DATA_DIR": str(out / f"{slug}-data")}
    with bento_server(out / f"{slug}.log", own, timeout_s) as base:
        yield base


def measure(groups: dict[str, list[tuple[str, bytes]]], concurrencies: Sequence[int], args, env, models,
            out: Path) -> dict[str, dict[int, dict[str, list[Phase]]]]:
    """Passes by server, concurrency and group, `args.rounds` of each.

    In turn (the default): each server started alone, warmed, every pass `rounds` times, stopped. Interleaved
    (`--interleave`): the three up at once, and every group's pass made by each server in turn, the order
    rotated each round, so that a load that drifts within minutes (a shared box) falls on all three alike.
    """
    phases: dict[str, dict[int, dict[str, list[Phase]]]] = {
        server: {c: {group: [] for group in groups} for c in concurrencies} for server in SERVERS}
    warm = warmup_films(groups, 2 * max(concurrencies))

    def warmed(server: str, base: str) -> str:
        phase = drive(f"{server} warm-up (not reported)", base, warm, max(concurrencies), 0, args.mask)
        if phase.problems:
            raise RuntimeError(f"{server}: {len(phase.problems)} warm-up films failed, e.g. {phase.problems[0]}")
        return base

    def one_pass(server: str, base: str, c: int, group: str, round_: int) -> None:
        name = f"{server}, {group}, c{c}, round {round_ + 1}"
        phases[server][c][group].append(drive(name, base, groups[group], c, 0, args.mask))

    if not args.interleave:
        for server in SERVERS:
            with serving(server, out, env, models, args.threads, args.start_timeout) as base:
                warmed(server, base)
                for round_ in range(args.rounds):
                    for c in concurrencies:
                        for group in groups:
                            one_pass(server, base, c, group, round_)
        return phases
    with contextlib.ExitStack() as stack:
        bases = {server: stack.enter_context(serving(server, out, env, models, args.threads, args.start_timeout))
                 for server in SERVERS}
        for server, base in bases.items():
            warmed(server, base)
        for round_ in range(args.rounds):
            order = SERVERS[round_ % 3:] + SERVERS[: round_ % 3]
            for c in concurrencies:
                for group in groups:
                    for server in order:
                        one_pass(server, bases[server], c, group, round_)
    return phases


def main(argv: list[str] | None = None) -> int:
    from tests.realdata import realdata_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=30, help="synthetic films (each as J2K lossless and lossy)")
    parser.add_argument("--real-repeat", type=int, default=8, help="posts of each real JPEG 2000 / JPEG film")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16], help="requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--rounds", type=int, default=1, help="passes of every group per server and concurrency")
    parser.add_argument("--interleave", action="store_true",
                        help="the three servers up at once, their passes alternated (for a shared, drifting box)")
    parser.add_argument("--mask", choices=("png", "rle", "none"), default="rle", help="?mask= on every request")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for all three servers; repeatable")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the naive server's torch threads")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench", help="synthetic data cache")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default data/bench/runs/<time>)")
    parser.add_argument("--append", type=Path, default=None, help="add the Markdown to the issue 15 section here")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for a server to become ready")
    args = parser.parse_args(argv)
    if args.synthetic < 0 or args.real_repeat < 0 or not (args.synthetic or args.real_repeat):
        parser.error("--synthetic and --real-repeat must be >= 0, and not both 0")
    if min(args.concurrency) < 1 or args.rounds < 1:
        parser.error("--concurrency and --rounds must be >= 1")
    command = "python -m load_tests.bench_compressed " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = dt.datetime.now()
    out = args.out or REPO / "data" / "bench" / "runs" / f"compressed-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    from service.models.model_set import resolve
    from service.settings import load_settings

    env = parse_env(args.service_env)
    settings = load_settings(environ={**os.environ, **env})
    models = resolve(settings)
    groups = by_group(real_corpus(realdata_dir() / "chest", args.real_repeat) + synthetic_corpus(
        args.synthetic, args.seed, args.data))
    print(", ".join(f"{group}: {len(films)}" for group, films in groups.items())
          + f"; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    phases = measure(groups, args.concurrency, args, env, models, out)

    tables: dict[int, dict[str, dict]] = {}
    for c in args.concurrency:
        tables[c] = {group: group_row({s: phases[s][c][group] for s in SERVERS}) for group in groups}
        j2k = [group for group in J2K_GROUPS if group in groups]
        if j2k:
            tables[c][ALL_J2K] = group_row({s: [p for g in j2k for p in phases[s][c][g]] for s in SERVERS})
    every = [p for server in phases.values() for by_c in server.values() for found in by_c.values() for p in found]
    off_vs_naive = max(row["off_vs_naive"]["max_abs_score_difference"] for t in tables.values() for row in t.values())
    report = {
        "date": f"{started:%Y-%m-%d}", "command": command, "machine": machine(),
        "models": f"{models.classifier.label} + {models.segmenter.label}",
        "settings": {"hflip_tta": settings.hflip_tta, "mask": args.mask, "service_env": env,
                     "warmup": 2 * max(args.concurrency), "seed": args.seed, "rounds": args.rounds,
                     "interleave": args.interleave},
        "films": {group: len(films) for group, films in groups.items()},
        "load": (min(p.load_before for p in every), max(p.load_before for p in every)),
        "tables": tables, "off_vs_naive_max": off_vs_naive,
    }
    text = markdown(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(text)
    print("\n" + text + f"\nresults in {out}")
    if args.append is not None:
        document = args.append.read_text(encoding="utf-8") if args.append.exists() else ""
        args.append.write_text(append_to_section(document, text, SECTION, PLACEHOLDER), encoding="utf-8")
        print(f"added to {args.append}, section {SECTION!r}")

    failures = [f"{phase.name}: {len(phase.problems)} non-200 answers, e.g. {phase.problems[0]}"
                for phase in every if phase.problems]
    if not off_vs_naive <= 1e-3:
        failures.append(f"reduced off and the naive server differ by up to {off_vs_naive:.2e} (> 1e-3): "
                        "both decode in full, so they must answer the same")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
