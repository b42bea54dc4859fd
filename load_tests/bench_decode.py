"""Decoder benchmark: our plugin choice per transfer syntax vs pydicom's default plugin order, in one run.

    python load_tests/bench_decode.py [--repeat 5]

Uses the real chest and hip films in ../shared/realdata (JPEG Baseline, JPEG 2000, JPEG-LS) and an RLE copy
made on the fly; prints ms per decode for both and the ratio. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.imaging.decoding import plugin_for  # noqa: E402
from tests.realdata import realdata_dir  # noqa: E402


def _time_decode(data: bytes, plugin: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        ds = pydicom.dcmread(io.BytesIO(data))
        start = time.perf_counter()
        ds.pixel_array_options(decoding_plugin=plugin)
        ds.pixel_array  # noqa: B018  # decoding is the point
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = realdata_dir()
    if not root.is_dir():
        raise SystemExit(f"real test data not found at {root} (set PTX_REALDATA)")
    samples = (
        "chest/siim_cr_jpegbaseline_mono2.dcm",
        "chest/philips_cr_j2k_lossy_mono1.dcm",
        "chest/canon_dx_j2k_lossless_mono1_inverse.dcm",
        "other/cr_hip_jpegls_lossless.dcm",
    )
    files = {name: (root / name).read_bytes() for name in samples}
    hip = pydicom.dcmread(io.BytesIO(files["other/cr_hip_jpegls_lossless.dcm"]))
    hip.compress(RLELossless, hip.pixel_array, encoding_plugin="pylibjpeg")
    buffer = io.BytesIO()
    hip.save_as(buffer)
    files["cr_hip re-encoded as RLE Lossless"] = buffer.getvalue()

    print(f"{'file':48s} {'syntax':42s} {'ours':>9s} {'pydicom':>9s} {'speed-up':>8s}")
    for name, data in files.items():
        tsyntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
        plugin = plugin_for(tsyntax)
        ours = _time_decode(data, plugin, args.repeat)
        default = _time_decode(data, "", args.repeat)
        print(f"{name:48s} {tsyntax.name[:40]:42s} {ours:7.1f}ms {default:7.1f}ms {default / ours:7.2f}x  ({plugin or 'default'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
