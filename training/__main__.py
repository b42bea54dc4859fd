"""`python -m training <command>`: one parser with a subcommand per tool (only `synth` so far).

Later commands (`train`, `evaluate`, `export`, `demo`) add a `_add_<name>(subparsers)` function that sets
`handler`; `main` stays the same. Bad arguments give one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DIFFICULTY_HELP = ("lesion conspicuity: realistic (default) = lesion 2-10%% darker than adjacent lung, pleural "
                   "line 5-15%% brighter than its surroundings (fractions of the display range); easy = both x2; "
                   "hard = both x0.5. Recorded in synth.json.")


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage block and exit itself
        raise UsageError(f"{self.prog}: error: {message}")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _size(text: str) -> int:
    value = _int_at_least(256)(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"size must be >= 256 and a multiple of 32, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _add_synth(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate a synthetic SIIM-style data set (DICOM + train-rle.csv)",
                              description="Write DIR/dicom/<SOPInstanceUID>.dcm, DIR/train-rle.csv (SIIM layout) "
                                          "and DIR/synth.json. Deterministic for a seed, whatever --workers.")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--count", type=_int_at_least(1), required=True, help="number of images (>= 1)")
    p.add_argument("--seed", type=_int_at_least(0), required=True, help="random seed (>= 0)")
    p.add_argument("--prevalence", type=_fraction, default=0.22, help="fraction of images with >= 1 lesion")
    p.add_argument("--size", type=_size, default=1024, help="image size in pixels (>= 256, multiple of 32)")
    p.add_argument("--uncompressed", action="store_true",
                   help="write every file as Explicit VR Little Endian (default: a lossless mix)")
    p.add_argument("--difficulty", choices=["realistic", "easy", "hard"], default="realistic", help=DIFFICULTY_HELP)
    p.add_argument("--workers", type=_int_at_least(1), default=os.cpu_count() or 1, help="worker processes")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--shapes", type=Path, default=None,
                        help="SIIM-format RLE CSV (.csv or .csv.gz) to take real lesion shapes from; default "
                             "$PTX_REALDATA/labels/siim-pneumothorax-train-rle.csv.gz, else "
                             "<repo>/../shared/realdata/labels/siim-pneumothorax-train-rle.csv.gz")
    shapes.add_argument("--procedural-shapes", action="store_true",
                        help="use generated crescents and apical caps instead of real SIIM shapes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from training.synth.generate import SynthConfig, default_shapes_path, run
    from training.synth.shapes import ShapeBank, ShapeSourceError

    shapes = None
    if not args.procedural_shapes:
        shapes = args.shapes or default_shapes_path(REPO_ROOT)
        if not shapes.is_file():
            raise UsageError(f"training synth: error: shape file {shapes} not found; pass --shapes PATH "
                             "(a SIIM train-rle.csv[.gz]) or --procedural-shapes")
        try:
            ShapeBank.from_csv(shapes)
        except ShapeSourceError as exc:
            raise UsageError(f"training synth: error: {exc}") from None
    config = SynthConfig(out=args.out, count=args.count, seed=args.seed, prevalence=args.prevalence,
                         size=args.size, uncompressed=args.uncompressed, difficulty=args.difficulty,
                         workers=args.workers, shapes=shapes)
    summary = run(config, progress=not args.quiet)
    print(f"wrote {args.count} images ({summary['positives']} positive) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_synth(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run; returns the exit code (2 for a bad command line)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
