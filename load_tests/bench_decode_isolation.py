"""What the decode time limit costs: compressed films decoded in the calling thread vs in the decode pool.

    python load_tests/bench_decode_isolation.py [--repeat 15]

The pool (service/decode_pool.py) sends the pixel elements to a worker process and gets the decoded array
back through a pipe; this measures that hop on the real compressed chest films in ../shared/realdata and on
a tiny RLE image (where the hop is nearly all of it). Median ms per decode, warm worker, one at a time.
Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.imaging.decode_pool import DecodePool  # noqa: E402
from service.imaging.decoding import decode_here  # noqa: E402
from tests.realdata import realdata_dir  # noqa: E402

FILES = ["chest/siim_cr_jpegbaseline_mono2.dcm", "chest/philips_cr_j2k_lossy_mono1.dcm",
         "chest/canon_dx_j2k_lossless_mono1_inverse.dcm", "other/MR_small_RLE.dcm"]


def _median_ms(function, ds: pydicom.Dataset, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(ds)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    pool = DecodePool(size=1, timeout_s=60, decode=decode_here)
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f}; {args.repeat} decodes each, medians")
        print("| film | pixels | in thread ms | in the pool ms | overhead ms | overhead |")
        print("|---|---|---|---|---|---|")
        for name in FILES:
            ds = pydicom.dcmread(io.BytesIO((realdata_dir() / name).read_bytes()))
            pool.decode(ds)  # warm: the worker has started and imported its decoders
            # Interleaved, so both see the same load on a shared box.
            here, there = [], []
            for _ in range(args.repeat):
                here.append(_median_ms(decode_here, ds, 1))
                there.append(_median_ms(pool.decode, ds, 1))
            a, b = statistics.median(here), statistics.median(there)
            print(f"| {name.split('/')[-1]} | {ds.Rows}x{ds.Columns} | {a:.1f} | {b:.1f} | {b - a:+.1f} | "
                  f"{(b - a) / a:+.0%} |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        pool.close()


if __name__ == "__main__":
    main()
