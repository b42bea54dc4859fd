"""The DICOM side's result objects (SEG + SR + SC overlay) with and without decoding the film again, in one run.

    python load_tests/bench_results.py [--repeat 7]

For each real chest film in ../shared/realdata: a positive finding (two regions), then the intake's work
after triage (`build_results(..., overlay=True)`, what `Pacs._write_results` does before writing files),
once decoding the film for the overlay as before (`pixels=None`) and once given the pixels triage already
decoded (`Finding.display`). Interleaved, medians; prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.cascade.finding import PriorityBands, build_finding  # noqa: E402
from service.cascade.postprocess import CascadeResult  # noqa: E402
from service.imaging.reader import read_radiograph  # noqa: E402
from service.pacs.results import build_results  # noqa: E402
from tests.realdata import CHEST, realdata_dir  # noqa: E402

MODELS = {"classifier": {"name": "ptx-classifier-demo", "version": "0.1.0", "backend": "onnxruntime-cpu"},
          "segmenter": {"name": "ptx-segmenter-demo", "version": "0.2.0", "backend": "onnxruntime-cpu"}}


def regions(shape: tuple[int, int]) -> np.ndarray:
    rows, columns = shape
    y, x = np.ogrid[:rows, :columns]
    mask = ((y - 0.2 * rows) / (0.08 * rows)) ** 2 + ((x - 0.3 * columns) / (0.12 * columns)) ** 2 <= 1.0
    mask[int(0.7 * rows): int(0.8 * rows), int(0.62 * columns): int(0.7 * columns)] = True
    return mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    root = realdata_dir()
    print("| film | pixels | decoded again ms | given ms | saved ms | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for entry in CHEST:
        path = root / entry.path
        source = pydicom.dcmread(path)
        radiograph = read_radiograph(path)
        mask = regions(radiograph.pixels.shape)
        finding = build_finding(radiograph, CascadeResult(score=0.93, positive=True, gated=True, mask=mask,
                                                          probability_max=0.93),
                                0.5, PriorityBands(), models=MODELS)
        again, given = [], []
        for _ in range(args.repeat):
            for pixels, times in ((None, again), (radiograph.pixels, given)):
                started = time.perf_counter()
                build_results(pydicom.dcmread(path), finding, overlay=True, pixels=pixels)
                times.append((time.perf_counter() - started) * 1e3)
        a, g = statistics.median(again), statistics.median(given)
        syntax = source.file_meta.TransferSyntaxUID.name
        print(f"| {path.name} ({syntax}) | {radiograph.columns}x{radiograph.rows} | {a:.1f} | {g:.1f} | "
              f"{a - g:+.1f} | {a / g:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
