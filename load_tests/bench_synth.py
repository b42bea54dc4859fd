"""Benchmark `python -m training synth`: images/s for --uncompressed and for the default encoding mix.

Usage: python load_tests/bench_synth.py [--count 200] [--size 1024] [--workers 2] [--procedural-shapes]
Runs the real CLI entry point (`training.__main__.main`) into a temporary directory, so the number includes
shape-bank loading, the worker pool and file writing, exactly what a user waits for.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.__main__ import main as training_main  # noqa: E402


def bench(label: str, extra: list[str], args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        argv = ["synth", "--out", tmp, "--count", str(args.count), "--seed", "0", "--size", str(args.size),
                "--workers", str(args.workers), "--quiet", *extra]
        if args.procedural_shapes:
            argv.append("--procedural-shapes")
        start = time.perf_counter()
        code = training_main(argv)
        elapsed = time.perf_counter() - start
        if code:
            raise SystemExit(f"synth failed with exit code {code}")
    rate = args.count / elapsed
    print(f"{label:<14} size {args.size} workers {args.workers}: {args.count} images in {elapsed:.1f} s = {rate:.1f} images/s")
    return rate


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--procedural-shapes", action="store_true")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    bench("uncompressed", ["--uncompressed"], args)
    bench("default mix", [], args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
