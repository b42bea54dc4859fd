"""Benchmark the triage service against a naive server and against the models alone (issue #4 §6).

    python -m load_tests.bench_service --count 300 --concurrency 16 [--out DIR] [--append docs/benchmarks.md]
        [--service-env KEY=VALUE ...] [--classifier DIR --segmenter DIR] [--mask rle] [--seed 0]

One run, three phases, each alone on the CPU (a server is stopped before the next one starts):

1. baseline: `load_tests/naive_server.py` (one request at a time, PyTorch eager, both models on every film);
2. service: `bentoml serve` from the repository root, started and stopped by process group;
3. model-only limit: the service's model files (its PTX_PRECISION) on ONNX Runtime in this process, with its
   PTX_INTRA_OP_THREADS (all cores when 0); with PTX_MODELS_IN_EDGE and PTX_MODEL_INSTANCES=k the per-film
   times are divided by k (k runs at once: an upper bound, as if they shared nothing).

Both servers get the same N synthetic 1024² uncompressed DICOMs (22 % prevalence; generated once and cached
under data/bench/ by count and seed), each posted once as an `application/dicom` body, from the same async
client (httpx) at the same concurrency C, after a warm-up of 2·C requests that are not counted. Every answer
must be 200 and the service's scores must match the baseline's for the same files (a check that both do
the same work). The model-only limit is 1 / (t_classify + g · t_segment) with per-film times at the best
batch size (TTA passes included), for g = 0.22 (the design's prevalence) and for the gated fraction the
service actually showed. Results go to --out (JSON, Markdown, server logs); --append adds the Markdown
with the command, date, machine and settings to its section of a document (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
PREVALENCE = 0.22  # the design's prevalence (DESIGN.md "Why classify-then-segment")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


# --- the numbers ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadSummary:
    """One phase of load: successful films per second of wall time, latency percentiles of the successes."""

    requests: int
    ok: int
    errors: int
    wall_s: float
    throughput: float  # successful films / wall_s
    p50_ms: float
    p99_ms: float
    mean_ms: float


def summarise(latencies_s: Sequence[float], errors: int, wall_s: float) -> LoadSummary:
    """Summary of `latencies_s` (seconds, successful requests only) over a phase lasting `wall_s`.

    Percentiles interpolate linearly between order statistics (numpy's default): the p50 of 1..100 ms is
    50.5 ms. Throughput counts only successes, so a server that fails fast does not look fast.
    """
    if wall_s <= 0:
        raise ValueError(f"wall_s must be positive, got {wall_s}")
    if errors < 0:
        raise ValueError(f"errors must be >= 0, got {errors}")
    values = np.asarray(latencies_s, dtype=np.float64) * 1000
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise ValueError("latencies must be finite and non-negative")
    p50, p99, mean = (
        (float(np.percentile(values, 50)), float(np.percentile(values, 99)), float(values.mean()))
        if values.size else (float("nan"),) * 3
    )
    return LoadSummary(requests=int(values.size) + errors, ok=int(values.size), errors=errors, wall_s=wall_s,
                       throughput=values.size / wall_s, p50_ms=p50, p99_ms=p99, mean_ms=mean)


def model_only_limit(t_classify_s: float, t_segment_s: float, gated_fraction: float) -> float:
    """Films per second the models alone allow: 1 / (t_classify + g · t_segment).

    `t_classify_s` and `t_segment_s` are per-film model times (TTA passes included) and `g` the fraction
    of films the gate sends to the segmenter. Decoding, pre- and post-processing and HTTP are not in it,
    so a server can approach it but never pass it on the same cores.
    """
    if t_classify_s <= 0 or t_segment_s < 0:
        raise ValueError(f"need t_classify > 0 and t_segment >= 0, got {t_classify_s}, {t_segment_s}")
    if not 0.0 <= gated_fraction <= 1.0:
        raise ValueError(f"gated_fraction must be in [0, 1], got {gated_fraction}")
    return 1.0 / (t_classify_s + gated_fraction * t_segment_s)


@dataclass(frozen=True)
class Agreement:
    compared: int
    max_abs_score_difference: float
    label_mismatches: list[str]
    models_equal: bool


def model_names(models: object) -> dict[str, str]:
    """An answer's `models` as {role: "name version"}, whether it says "name version" or {name, version, ...}."""
    if not isinstance(models, dict):
        return {}
    return {role: f"{value.get('name')} {value.get('version')}" if isinstance(value, dict) else str(value)
            for role, value in models.items()}


def agreement(reference: dict[str, dict], other: dict[str, dict]) -> Agreement:
    """Compare two servers' 200 answers for the same files (keyed by file name): scores, labels, models
    (by name and version: the service also says which backend ran them)."""
    names = sorted(set(reference) & set(other))
    differences = [abs(float(reference[n]["score"]) - float(other[n]["score"])) for n in names]
    mismatches = [n for n in names if reference[n]["label"] != other[n]["label"]]
    models = {json.dumps(model_names(body.get("models")), sort_keys=True)
              for body in (*reference.values(), *other.values())}
    return Agreement(len(names), max(differences, default=float("nan")), mismatches, len(models) == 1)


# --- the films --------------------------------------------------------------------------------------------

def synthetic_films(count: int, seed: int, root: Path) -> list[Path]:
    """N uncompressed 1024² synthetic DICOMs at 22 % prevalence, generated once per (count, seed)."""
    folder = root / f"synth-n{count}-s{seed}-p{PREVALENCE}-1024"
    done = folder / "synth.json"
    if not done.is_file():
        print(f"generating {count} synthetic films into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "training", "synth", "--out", str(folder), "--count", str(count),
                        "--seed", str(seed), "--prevalence", str(PREVALENCE), "--uncompressed", "--quiet"],
                       cwd=REPO, check=True)
    files = sorted((folder / "dicom").glob("*.dcm"))
    if len(files) != count:
        raise RuntimeError(f"{folder} holds {len(files)} DICOMs, expected {count}: delete it and run again")
    return files


# --- the load ---------------------------------------------------------------------------------------------

@dataclass
class Record:
    name: str
    status: int | None  # None: no HTTP answer (connection error, timeout)
    latency_s: float
    body: dict | None = None  # the answer without mask_png / rle, or the error body
    problem: str | None = None


def _trim(body: object) -> dict | None:
    if not isinstance(body, dict):
        return None
    return {key: value for key, value in body.items() if key not in ("mask_png", "rle")}


async def post_all(base: str, films: Sequence[tuple[str, bytes]], concurrency: int, mask: str,
                   timeout_s: float = 600) -> tuple[list[Record], float]:
    """Post every film once, `concurrency` requests in flight; the records and the wall time of the phase."""
    url = f"{base}/v1/triage?mask={mask}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    records: list[Record] = []
    pending = iter(films)  # shared by the workers: each film is taken once

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            for name, payload in pending:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=payload, headers={"Content-Type": "application/dicom"})
                except httpx.HTTPError as exc:
                    records.append(Record(name, None, time.perf_counter() - started, problem=repr(exc)))
                    continue
                latency = time.perf_counter() - started
                try:
                    body = _trim(response.json())
                except ValueError:
                    body = None
                problem = None if response.status_code == 200 else f"{response.status_code}: {response.text[:300]}"
                if response.status_code == 503:
                    problem += f" (Retry-After: {response.headers.get('retry-after')})"
                records.append(Record(name, response.status_code, latency, body, problem))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - started


@dataclass
class Phase:
    name: str
    concurrency: int
    summary: LoadSummary
    load_before: float
    client_cpu_s: float  # CPU this process (the client) spent during the measured pass: it shares the cores
    answers: dict[str, dict] = field(repr=False)  # 200 answers by file name
    problems: list[str] = field(default_factory=list)
    latencies_s: dict[str, float] = field(default_factory=dict, repr=False)  # of the 200 answers, by file name

    def stage_means_ms(self) -> dict[str, float]:
        """Mean of each `timings_ms` stage over the answers that report it (the server's own clock)."""
        stages: dict[str, list[float]] = {}
        for body in self.answers.values():
            for stage, value in (body.get("timings_ms") or {}).items():
                stages.setdefault(stage, []).append(float(value))
        return {stage: float(np.mean(values)) for stage, values in stages.items()}


def drive(name: str, base: str, films: Sequence[tuple[str, bytes]], concurrency: int, warmup: int,
          mask: str) -> Phase:
    warm = [films[i % len(films)] for i in range(warmup)]
    if warm:
        warm_records, _ = asyncio.run(post_all(base, warm, concurrency, mask))
        failed = [r.problem for r in warm_records if r.status != 200]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} of {len(warm)} warm-up requests failed, e.g. {failed[0]}")
    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()
    records, wall = asyncio.run(post_all(base, films, concurrency, mask))
    client_cpu = time.process_time() - cpu_before
    ok = [r for r in records if r.status == 200]
    summary = summarise([r.latency_s for r in ok], len(records) - len(ok), wall)
    problems = [f"{r.name}: {r.problem}" for r in records if r.status != 200]
    print(f"{name}: {summary.ok}/{summary.requests} ok in {wall:.1f} s = {summary.throughput:.2f} films/s, "
          f"p50 {summary.p50_ms:.0f} ms, p99 {summary.p99_ms:.0f} ms (load average before {load_before:.2f}, "
          f"client CPU {client_cpu:.1f} s)", flush=True)
    return Phase(name, concurrency, summary, load_before, client_cpu, {r.name: r.body for r in ok if r.body}, problems,
                 {r.name: r.latency_s for r in ok})


# --- the servers ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def naive_server(log_path: Path, env: dict[str, str], classifier: Path, segmenter: Path, threads: int,
                 timeout_s: float = 120) -> Iterator[str]:
    """`python -m load_tests.naive_server` on a free loopback port; stopped by process group."""
    from tests.servers import free_port, server_process

    port = free_port()
    command = [sys.executable, "-m", "load_tests.naive_server", "--port", str(port), "--threads", str(threads),
               "--classifier", str(classifier), "--segmenter", str(segmenter)]
    with server_process(command, log_path, env, timeout_s, port=port) as base:
        yield base


def model_env(classifier: Path, segmenter: Path) -> dict[str, str]:
    """PTX_ variables that make the service pick these two model folders (root/<name>/<version>)."""
    from service.models.manifest import load_manifest

    root = classifier.resolve().parent.parent
    if segmenter.resolve().parent.parent != root:
        raise SystemExit(f"--classifier and --segmenter must live in one model repository (root/<name>/<version>): "
                         f"{classifier} and {segmenter}")
    return {"PTX_MODELS_DIR": str(root), "PTX_CLASSIFIER": load_manifest(classifier).name,
            "PTX_SEGMENTER": load_manifest(segmenter).name}


# --- the models alone -------------------------------------------------------------------------------------

def time_per_film(run, batch: np.ndarray, min_seconds: float = 0.5, min_repeats: int = 5) -> float:
    """Median seconds per film of `run(batch)`, after two unmeasured runs."""
    for _ in range(2):
        run(batch)
    durations: list[float] = []
    spent = 0.0
    while len(durations) < min_repeats or spent < min_seconds:
        started = time.perf_counter()
        run(batch)
        durations.append(time.perf_counter() - started)
        spent += durations[-1]
    return float(np.median(durations)) / len(batch)


def measure_models(classifier: Path, segmenter: Path, films: Sequence[Path], hflip_tta: bool,
                   threads: int, precision: str = "auto", instances: int = 1) -> dict[str, dict]:
    """Per-film time of the cascade's two model steps at each batch size (ORT CPU, as the pipeline calls them):
    the model files of `precision`, `threads` per run, divided by the `instances` that run at once."""
    from service.cascade.preprocess import to_batch
    from service.imaging.reader import read_radiograph
    from service.models.backends.factory import load_backend
    from service.models.inference import classify_scores, segment_maps
    from service.models.manifest import input_spec, load_manifest

    folders = {"classify": classifier, "segment": segmenter}
    manifests = {role: load_manifest(directory) for role, directory in folders.items()}
    backends = {role: load_backend(directory, manifests[role], "onnxruntime", intra_op_threads=threads,
                                   precision=precision) for role, directory in folders.items()}
    pixels = [read_radiograph(path).pixels for path in films[: max(BATCH_SIZES)]]
    while len(pixels) < max(BATCH_SIZES):
        pixels += pixels[: max(BATCH_SIZES) - len(pixels)]
    steps = {
        "classify": (to_batch(pixels, input_spec(manifests["classify"])),
                     lambda b: classify_scores(backends["classify"], b, hflip_tta)),
        "segment": (to_batch(pixels, input_spec(manifests["segment"])),
                    lambda b: segment_maps(backends["segment"], b, hflip_tta)),
    }
    result = {}
    for step, (batch, run) in steps.items():
        per_batch = {size: time_per_film(run, batch[:size]) / instances for size in BATCH_SIZES}
        best = min(per_batch, key=per_batch.get)
        result[step] = {"per_film_s": per_batch[best], "best_batch": best,
                        "per_film_s_by_batch": {str(k): v for k, v in per_batch.items()}}
        print(f"model only, {step}: " + ", ".join(f"b{k} {v * 1000:.2f} ms" for k, v in per_batch.items())
              + f" per film (TTA {'on' if hflip_tta else 'off'})", flush=True)
    return result


# --- the report -------------------------------------------------------------------------------------------

def gated_fraction(answers: dict[str, dict], gate: float) -> dict[str, float | None]:
    """Fraction of films segmented: from the answers' timings ("segment" key) and from score ≥ gate."""
    bodies = list(answers.values())
    if not bodies:
        return {"from_timings": None, "from_scores": None}
    timed = [b for b in bodies if isinstance(b.get("timings_ms"), dict)]
    return {
        "from_timings": sum("segment" in b["timings_ms"] for b in timed) / len(timed) if timed else None,
        "from_scores": sum(float(b["score"]) >= gate for b in bodies) / len(bodies),
    }


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model or platform.processor() or platform.machine()}), no GPU used"


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:,.0f}"


def _from_timings(detail: dict) -> str:
    value = detail.get("from_timings")
    return "" if value is None else f"; by the answers' timings {value:.2f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    base, serv = report["phases"]["baseline"]["summary"], report["phases"]["service"]["summary"]
    limits, models = report["limits"], report["models_only"]
    g_obs = limits["gated_fraction_observed"]
    ratio = serv["throughput"] / base["throughput"] if base["throughput"] else float("nan")
    lines = [
        f"### {report['date']}: {s['count']} films, concurrency {s['concurrency']}",
        "",
        f"`{report['command']}`",
        "",
        (f"Machine: {report['machine']}. Settings: hflip TTA {'on' if s['hflip_tta'] else 'off'}, mask={s['mask']}, "
        f"service env {s['service_env'] or '{}'} (PTX_MAX_BATCH_SIZE {s['max_batch_size']}, PTX_MAX_LATENCY_MS "
        f"{s['max_latency_ms']}), models {report['models']}, warm-up {s['warmup']} requests per server, "
        f"{s['threads']} threads for torch (baseline) and ONNX Runtime (model-only). "
        f"torch {s['versions']['torch']}, onnxruntime {s['versions']['onnxruntime']}, "
        f"bentoml {s['versions']['bentoml']}."),
        "",
        ("| server | client concurrency | films | errors | films/s | p50 latency | p99 latency | vs baseline "
        "| of model-only limit at 22 % | at observed gating |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, summary, vs in (("naive baseline (PyTorch eager, one at a time, no gate)", base, "1.00×"),
                               ("service (`bentoml serve`)", serv, f"{ratio:.2f}×")):
        lines.append(
            f"| {label} | {s['concurrency']} | {summary['requests']} | {summary['errors']} "
            f"| {summary['throughput']:.2f} | {_ms(summary['p50_ms'])} ms | {_ms(summary['p99_ms'])} ms | {vs} "
            f"| {summary['throughput'] / limits['at_prevalence']:.0%} "
            f"| {summary['throughput'] / limits['at_observed']:.0%} |"
        )
    classify, segment = models["classify"], models["segment"]
    how = models["how"]  # what the model-only figures ran with (precision, threads per run, instances)
    agree = report["agreement"]
    lines += [
        "",
        (f"Model-only (ONNX Runtime in-process, PTX_PRECISION {how['precision']}, {how['threads']} thread(s) per run"
         f"{f', per-film times divided by the {n} runs at once' if (n := how['instances']) > 1 else ''}; "
         f"per film {'with' if s['hflip_tta'] else 'without'} TTA, best batch): "
        f"classify {classify['per_film_s'] * 1000:.2f} ms (batch {classify['best_batch']}), "
        f"segment {segment['per_film_s'] * 1000:.2f} ms (batch {segment['best_batch']}). "
        "Limit 1 / (t_classify + g · t_segment): "
        f"**{limits['at_prevalence']:.1f} films/s at g = 0.22** (the design's prevalence); "
        f"**{limits['at_observed']:.1f} films/s at the observed g = {g_obs:.2f}** (share of the service's films "
        f"with score ≥ gate {report['gate']:.3f}{_from_timings(limits['gated_fraction_detail'])}); "
        f"{limits['no_gate']:.1f} films/s with both models on every film."),
        "",
        (f"Agreement, service vs baseline on the same {agree['compared']} films: max |Δscore| "
        f"{agree['max_abs_score_difference']:.1e}, {len(agree['label_mismatches'])} label mismatches, "
        f"models {'identical' if agree['models_equal'] else 'DIFFERENT'}."),
        "",
        ("Mean time per stage as each server reports it (`timings_ms`; the service's model stages include the "
        "wait for a batch):"),
        "",
    ]
    for phase in ("baseline", "service"):
        stages = report["phases"][phase]["stage_means_ms"]
        lines.append(f"- {phase}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    lines += [
        "",
        "Load average before the measured pass: " + ", ".join(
            f"{p} {report['phases'][p]['load_before']:.2f}" for p in ("baseline", "service"))
        + "; CPU the client itself used during it: " + ", ".join(
            f"{p} {report['phases'][p]['client_cpu_s']:.1f} s over {report['phases'][p]['summary']['wall_s']:.1f} s"
            for p in ("baseline", "service")) + ".",
        "",
    ]
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------------------

SECTION = "## Serving throughput: the service vs a naive server and the models' own limit (issue #4 §6)"
PLACEHOLDER = "No full run on a quiet CPU is recorded yet."


def append_to_section(document: str, text: str, section: str = SECTION, placeholder: str = PLACEHOLDER) -> str:
    """`document` with `text` added at the end of `section` (the serving-throughput one unless told; before
    the next `## ` heading, so other sections' appended tables stay in theirs), replacing the no-run-yet
    placeholder. A document without the section gets the section heading and `text` at its end."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == section), None)
    if start is None:
        return document.rstrip("\n") + f"\n\n{section}\n\n{text.rstrip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section_lines = [line for line in lines[start:end] if line.rstrip("\n") != placeholder]
    body = "".join(section_lines).rstrip("\n") + "\n\n" + text.rstrip() + "\n"
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + rest if rest else "")


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--service-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="synthetic films (each posted once per server)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, both servers")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured requests per server (default 2·C)")
    parser.add_argument("--mask", choices=("png", "rle", "none"), default="rle", help="?mask= on every request")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for both servers (e.g. PTX_MAX_BATCH_SIZE=32); repeatable")
    parser.add_argument("--classifier", type=Path, help="classifier model folder (default: the service's choice)")
    parser.add_argument("--segmenter", type=Path, help="segmenter model folder (default: the service's choice)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / ORT threads")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench", help="synthetic data cache")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default data/bench/runs/<time>)")
    parser.add_argument("--append", type=Path, default=None,
                        help="add the Markdown report to the serving-throughput section of this file")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for a server to become ready")
    args = parser.parse_args(argv)
    if args.count < 1 or args.concurrency < 1:
        parser.error("--count and --concurrency must be >= 1")
    if (args.classifier is None) != (args.segmenter is None):
        parser.error("give both --classifier and --segmenter, or neither")
    command = "python -m load_tests.bench_service " + shlex.join(sys.argv[1:] if argv is None else argv)
    warmup = 2 * args.concurrency if args.warmup is None else args.warmup
    started = dt.datetime.now()
    out = args.out or REPO / "data" / "bench" / "runs" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    from service.models.model_set import resolve
    from service.settings import load_settings

    env = parse_env(args.service_env)
    if args.classifier is not None:
        env = {**model_env(args.classifier, args.segmenter), **env}
    settings = load_settings(environ={**os.environ, **env})
    models = resolve(settings)
    chosen = (models.classifier.directory.resolve(), models.segmenter.directory.resolve())
    if args.classifier is not None and chosen != (args.classifier.resolve(), args.segmenter.resolve()):
        raise SystemExit(f"the service would load {models.classifier.directory} and {models.segmenter.directory} "
                         "(the latest version of each name): point --classifier/--segmenter at those")
    classifier, segmenter = models.classifier.directory, models.segmenter.directory

    paths = synthetic_films(args.count, args.seed, args.data)
    films = [(path.name, path.read_bytes()) for path in paths]
    print(f"{len(films)} films, {sum(len(b) for _, b in films) / 1e6:.0f} MB; concurrency {args.concurrency}, "
          f"warm-up {warmup}, mask={args.mask}, hflip TTA {'on' if settings.hflip_tta else 'off'}; "
          f"{models.classifier.label} + {models.segmenter.label}", flush=True)

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs before the run (want it near 0)", flush=True)
    with naive_server(out / "baseline.log", env, classifier, segmenter, args.threads, args.start_timeout) as base:
        baseline = drive("baseline", base, films, args.concurrency, warmup, args.mask)
    from tests.servers import bento_server

    with bento_server(out / "service.log", env, args.start_timeout) as base:
        service = drive("service", base, films, args.concurrency, warmup, args.mask)
    instances = settings.model_instances if settings.models_in_edge else 1
    model_threads = settings.intra_op_threads or args.threads
    models_only = measure_models(classifier, segmenter, paths, settings.hflip_tta, model_threads, settings.precision,
                                 instances)
    models_only["how"] = {"precision": settings.precision, "threads": model_threads, "instances": instances}

    t_classify, t_segment = models_only["classify"]["per_film_s"], models_only["segment"]["per_film_s"]
    observed = gated_fraction(service.answers, models.gate)
    g_observed = observed["from_scores"] if observed["from_scores"] is not None else PREVALENCE
    agree = agreement(baseline.answers, service.answers)
    import bentoml
    import onnxruntime
    import torch

    report = {
        "date": started.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "models": f"{models.classifier.label} + {models.segmenter.label}",
        "gate": models.gate,
        "settings": {"count": args.count, "concurrency": args.concurrency, "seed": args.seed, "warmup": warmup,
                     "mask": args.mask, "hflip_tta": settings.hflip_tta, "max_batch_size": settings.max_batch_size,
                     "max_latency_ms": settings.max_latency_ms, "service_env": env, "threads": args.threads,
                     "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                  "bentoml": bentoml.__version__}},
        "phases": {phase.name: {"summary": asdict(phase.summary), "load_before": phase.load_before,
                                "client_cpu_s": phase.client_cpu_s, "stage_means_ms": phase.stage_means_ms(),
                                "problems": phase.problems} for phase in (baseline, service)},
        "models_only": models_only,
        "limits": {"at_prevalence": model_only_limit(t_classify, t_segment, PREVALENCE),
                   "at_observed": model_only_limit(t_classify, t_segment, g_observed),
                   "no_gate": model_only_limit(t_classify, t_segment, 1.0),
                   "gated_fraction_observed": g_observed, "gated_fraction_detail": observed},
        "agreement": asdict(agree),
    }
    text = markdown(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(text)
    (out / "answers.json").write_text(json.dumps({"baseline": baseline.answers, "service": service.answers}) + "\n")
    print("\n" + text)
    print(f"results in {out}")
    if args.append is not None:
        document = args.append.read_text(encoding="utf-8") if args.append.exists() else ""
        args.append.write_text(append_to_section(document, text), encoding="utf-8")
        print(f"added to {args.append}, section {SECTION!r}")

    failures = []
    for phase in (baseline, service):
        if phase.problems:
            failures.append(f"{phase.name}: {len(phase.problems)} non-200 answers, e.g. {phase.problems[0]}")
    if agree.compared != args.count:
        failures.append(f"only {agree.compared} of {args.count} films answered by both servers")
    if not agree.max_abs_score_difference <= 1e-3:
        failures.append(f"scores differ by up to {agree.max_abs_score_difference:.2e} (> 1e-3)")
    if not agree.models_equal:
        failures.append("the two servers report different models")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
