"""The long fuzz run: the strategies of the test suite's fuzz tests (`tests/fuzz_cases.py`) with a large budget.

    python load_tests/fuzz_long.py --examples 20000                      # read_radiograph and the RLE decoder
    python load_tests/fuzz_long.py --targets http --examples 3000        # a real `bentoml serve` over HTTP
    python load_tests/fuzz_long.py --targets imaging --minutes 60 --seed 7

Each target runs in a child process under an address-space limit (RLIMIT_AS, `--memory-gb`) and a per-case
alarm (`--case-timeout-s`), so a runaway allocation or a hang is a finding, not a dead box. A case that ends
in anything but the allowed outcomes (imaging: a Radiograph or a RadiographError with a known code and no
patient data in its message; RLE: a mask or an RLEError; HTTP: a 2xx, or a 4xx in our error shape) is
counted, its input saved under `--out`, and the run goes on. Cases run in batches (`--batch`), each its own
Hypothesis run seeded from `--seed`: an error of the harness itself ends a batch, is counted under "HARNESS
ERRORS", and the run goes on. Prints one line per target with the number of cases run and the outcomes (the
counts up to the last batch if the fuzzing process dies), and exits 1 if anything was found. Case counts of
recorded runs: docs/service.md, "Limits".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class CaseTimeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise CaseTimeout


def _record(findings: collections.Counter, out: Path, target: str, data: bytes, exc: BaseException) -> None:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    key = f"{type(exc).__name__}: {str(exc)[:160]} @ {where.filename}:{where.lineno}" if where else repr(exc)[:200]
    if key not in findings:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{target}-{len(findings)}.bin").write_bytes(data)
        print(f"FINDING {target} #{len(findings)}: {key}", file=sys.stderr, flush=True)
    findings[key] += 1


def child(target: str, examples: int, seconds: float, seed: int, case_timeout_s: int, out: Path, url: str,
          batch: int = 500) -> dict:
    """Run one target in this (limited) process, `batch` cases per Hypothesis run; the summary as a dict."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as seeded
    from hypothesis import strategies as st

    from tests.fuzz_cases import (
        ALL_FILES,
        Plan,
        apply_plan,
        check_outcome,
        load_files,
        patient_values,
        plans,
    )
    from tests.realdata import realdata_dir

    outcomes: collections.Counter[str] = collections.Counter()
    findings: collections.Counter[str] = collections.Counter()
    harness: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _alarm)
    files = load_files(realdata_dir(), ALL_FILES)
    common = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))

    def out_of_time() -> bool:
        return time.monotonic() - started > seconds

    @contextlib.contextmanager
    def one_case(data: bytes) -> Iterator[None]:
        """One case under the alarm: any exception but KeyboardInterrupt is a finding (pytest.fail raises a
        BaseException too), recorded with its input; the run goes on."""
        signal.alarm(case_timeout_s)
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            _record(findings, out, target, data, exc)
            outcomes["FINDING"] += 1
        finally:
            signal.alarm(0)

    # Every value a case uses is drawn by @given(**strategies) before its body runs, so the clock check in the body only
    # decides whether to use them: what Hypothesis sees drawn never depends on time (drawing inside the body
    # after a clock check made data generation differ between runs: FlakyStrategyDefinition, seed 8675309).
    if target == "imaging":
        from service.imaging.acceptance import permissive_policy

        strategies = {"plan": plans(tuple(files)), "permissive": st.booleans()}

        def run(plan: Plan, permissive: bool) -> None:
            if out_of_time():
                return
            mutant = apply_plan(plan, files)
            with one_case(mutant):
                outcome = check_outcome(mutant, permissive_policy() if permissive else None,
                                        patient_values(files[plan.name]))
                outcomes["radiograph" if hasattr(outcome, "pixels") else outcome.code.value] += 1

    elif target == "rle":
        import numpy as np

        from service.cascade import rle

        token = st.one_of(st.integers(-5, 5000), st.integers(), st.sampled_from(["", "x", "1.5", "-1", "1_0"]))

        strategies = {"text": st.one_of(st.text(max_size=400), st.lists(token.map(str), max_size=40).map(" ".join)),
                      "height": st.integers(1, 512), "width": st.integers(1, 512)}

        def run(text: str, height: int, width: int) -> None:
            if out_of_time():
                return
            with one_case(text.encode("utf-8", "replace")):
                try:
                    mask = rle.decode(text, height, width)
                    assert mask.shape == (height, width) and np.array_equal(rle.decode(rle.encode(mask), height, width),
                                                                            mask)
                    outcomes["mask"] += 1
                except rle.RLEError:
                    outcomes["RLEError"] += 1

    elif target == "http":
        import tests.http.test_fuzz_http as http_fuzz

        small = load_files(realdata_dir(), http_fuzz.FILMS)

        strategies = {"case": http_fuzz.fuzz_request(small)}

        def run(case: tuple[str, bytes, str | None]) -> None:
            if out_of_time():
                return
            path, body, content_type = case
            with one_case(body):
                status, answer = http_fuzz.exchange(url, http_fuzz.request_bytes(path, body, content_type))
                http_fuzz.check_answer(status, answer, path)
                outcomes[str(status)] += 1
    else:
        raise SystemExit(f"unknown target {target!r}")

    def summary() -> dict:
        return {"target": target, "cases": sum(outcomes.values()), "seconds": round(time.monotonic() - started, 1),
                "seed": seed, "batches": batches, "outcomes": dict(outcomes.most_common()),
                "findings": dict(findings), "harness_errors": dict(harness),
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

    # Batches of `batch` cases, each its own Hypothesis run from a seed derived from (seed, batch number): the
    # budget is checked between batches (so Hypothesis is never left generating cases nobody runs), and an
    # error of the harness itself (Hypothesis raising FlakyStrategyDefinition, say) ends one batch, is counted
    # with its type and message, and the run goes on. A progress line after each batch keeps the counts
    # where the parent can read them even if this process is then killed.
    planned = batches = 0
    while planned < examples and not out_of_time():
        size = min(batch, examples - planned)
        test = seeded(batch_seed(seed, batches))(settings(common, max_examples=size)(given(**strategies)(run)))
        try:
            test()
        except Exception as exc:  # noqa: BLE001 -- cases catch their own failures: this is the harness
            harness[f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"] += 1
            print(f"HARNESS ERROR {target} batch {batches}: {type(exc).__name__}", file=sys.stderr, flush=True)
        planned, batches = planned + size, batches + 1
        print(json.dumps(summary()), flush=True)
    return summary()


def batch_seed(seed: int, number: int) -> int:
    """The Hypothesis seed of batch `number` of a run seeded `seed`: the same run for the same seed, and no
    batch of seed 7 repeats a batch of seed 8 (as seed + number would)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:8], "little")


def _limit(memory_gb: float) -> None:
    limit = int(memory_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="imaging,rle", help="comma-separated: imaging, rle, http")
    parser.add_argument("--examples", type=int, default=20000, help="cases per target (upper bound)")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget per target")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit of the fuzzing process")
    parser.add_argument("--case-timeout-s", type=int, default=30)
    parser.add_argument("--batch", type=int, default=500, help="cases per Hypothesis run (the budget is checked "
                        "between runs; a harness error ends one run, not the target)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fuzz")
    parser.add_argument("--url", default=None, help="http target: a running service; default: start one")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.examples, args.minutes * 60, args.seed, args.case_timeout_s,
                               args.out, args.url or "", args.batch)), flush=True)
        return

    found = False
    for target in args.targets.split(","):
        server = None
        url = args.url
        if target == "http" and url is None:
            from tests.servers import bento_server

            log = args.out / "http-server.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            import tests.http.test_fuzz_http as http_fuzz

            env = {"PTX_DATA_DIR": str(args.out / "http-data"), "PTX_MAX_FILE_BYTES": str(http_fuzz.MAX_BYTES),
                   "PTX_MAX_FILES_PER_REQUEST": str(http_fuzz.MAX_FILES), "PTX_MAX_BATCH_SIZE": "4"}
            server = bento_server(log, env=env, timeout_s=300)
            url = server.__enter__()
        try:
            command = [sys.executable, __file__, "--child", target, "--examples", str(args.examples), "--minutes",
                       str(args.minutes), "--seed", str(args.seed), "--case-timeout-s", str(args.case_timeout_s),
                       "--out", str(args.out), "--batch", str(args.batch)] + (["--url", url] if url else [])
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    preexec_fn=lambda: _limit(args.memory_gb))
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            found = True
            print(f"{target}: the fuzzing process ended with {result.returncode} (killed by the memory limit or a "
                  f"crash?)\n{result.stderr[-3000:]}")
            if not lines:
                continue
            print(f"{target}: counts up to its last complete batch:")
        summary = json.loads(lines[-1])
        found |= bool(summary["findings"]) or bool(summary["harness_errors"])
        print(f"{target}: {summary['cases']} cases in {summary['seconds']} s (seed {summary['seed']}, "
              f"{summary['batches']} batches of {args.batch}, max RSS {summary['max_rss_mb']} MB under a "
              f"{args.memory_gb:g} GB limit): {summary['outcomes']}"
              + (f"; FINDINGS {summary['findings']}" if summary["findings"] else "; no findings")
              + (f"; HARNESS ERRORS {summary['harness_errors']}" if summary["harness_errors"] else ""), flush=True)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
