"""INT8 against FP32 on the CPU in one run: speed per model at its best batch, and (optionally) accuracy.

    python load_tests/bench_int8.py [--threads 0] [--rounds 9] [--production-rounds 3] [--skip-production]
                                    [--accuracy DIR [--accuracy-only]]

Speed ("models only": ONNX Runtime's CPU provider with the service's session options, float32 input ready,
no decoding or post-processing): for each model and batch size the FP32 and the INT8 session are called in
turn, `--rounds` times each after a warm-up call, so both meet the same load on a shared machine; the
figure is the fastest call's ms per film (as `timeit` advises: slower calls measure the other processes,
which on a shared 2-core machine move a median by 2x from one run to the next). Each precision's best batch is
the one with the fewest ms per film, and
the ratio printed is FP32's best over INT8's best (the speed-up a batching service gets), with the
same-batch ratios beside it. Models:

* the bundled demo classifier (512²) and segmenter (256²), ResNet-18 width 16: their committed model.onnx and
  model.int8.onnx;
* production-sized stand-ins at 512², built from service/models/networks as training/configs/siim-gpu.yaml
  defines them (ResNet-34 width 64; U-Net with scSE and five decoder blocks) with random weights, exported
  and quantised (as training/quantize.py does, on 4 seeded N(0, 1) inputs) in a temporary folder: their
  speed is real, their outputs mean nothing, and nothing of them is kept.

Accuracy (`--accuracy DIR`, a SIIM-format synthetic folder never used in training, e.g. the demo's test set
`python -m training synth --out DIR --count 600 --seed 9001 --prevalence 0.22`): the served cascade (hflip
TTA, gate, triplet) with the bundled models at INT8 and at FP32 on the same films
(`training.quantize.compare_precisions`): AUC, Dice on positives, and the per-film differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import onnxruntime as ort

from service.models.backends.onnxruntime import session_options
from service.models.manifest import load_manifest

DEMO = {"demo classifier (R18 w16, 512²)": ROOT / "models" / "ptx-classifier-demo" / "0.2.0",
        "demo segmenter (R18 w16 U-Net, 256²)": ROOT / "models" / "ptx-segmenter-demo" / "0.2.0"}
PRODUCTION_CONFIG = ROOT / "training" / "configs" / "siim-gpu.yaml"
PRODUCTION_SIZE = 512
DEMO_BATCHES = (1, 2, 4, 8, 16)
PRODUCTION_BATCHES = (1, 2, 4)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(path), session_options(threads, 1), providers=["CPUExecutionProvider"])


def _call(session: ort.InferenceSession, batch: np.ndarray) -> Callable[[], float]:
    name = session.get_inputs()[0].name

    def timed() -> float:
        started = time.perf_counter()
        session.run(None, {name: batch})
        return time.perf_counter() - started

    return timed


def compare_speed(fp32: Path, int8: Path, size: int, batches: tuple[int, ...], threads: int,
                  rounds: int) -> dict[int, tuple[float, float]]:
    """{batch: (FP32 ms per film, INT8 ms per film)}, the fastest of `rounds` interleaved calls each."""
    sessions = (_session(fp32, threads), _session(int8, threads))
    result = {}
    for batch_size in batches:
        batch = np.random.default_rng(batch_size).standard_normal((batch_size, 1, size, size), dtype=np.float32)
        calls = [_call(session, batch) for session in sessions]
        for call in calls:
            call()  # warm-up: first-run allocations
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            for call, record in zip(calls, times):
                record.append(call())
        result[batch_size] = tuple(min(record) * 1000 / batch_size for record in times)
    return result


def production_models(folder: Path) -> dict[str, tuple[Path, Path]]:
    """The siim-gpu networks at 512² with random weights, exported and quantised into `folder`."""
    import torch
    import yaml

    from service.models.backends.torch_backend import build_network, spec_from_config
    from training.export import export_onnx
    from training.quantize import quantize_onnx

    torch.manual_seed(0)
    config = yaml.safe_load(PRODUCTION_CONFIG.read_text(encoding="utf-8"))
    calibration = np.random.default_rng(0).standard_normal((4, 1, PRODUCTION_SIZE, PRODUCTION_SIZE),
                                                           dtype=np.float32)
    models = {}
    for section, task in (("classifier", "classification"), ("segmenter", "segmentation")):
        spec = spec_from_config(task, config[section]["network"], config[section]["input"]["channels"])
        network = build_network(spec)
        if getattr(network, "aux_head", None) is not None:
            network.aux_head = None  # never used at inference, never exported
        fp32, int8 = folder / f"{section}.onnx", folder / f"{section}.int8.onnx"
        export_onnx(network.eval(), fp32, PRODUCTION_SIZE)
        quantize_onnx(fp32, int8, calibration)
        parts = [f"R{spec.encoder_depth} w{spec.width}"] + (["scSE"] if spec.scse else [])
        parts += [f"{spec.decoder_blocks} decoder blocks"] if task == "segmentation" else []
        models[f"siim-gpu {section} ({', '.join(parts)}, {PRODUCTION_SIZE}², random weights)"] = (fp32, int8)
    return models


def _report(label: str, speeds: dict[int, tuple[float, float]]) -> dict[str, Any]:
    best_fp32 = min(speeds, key=lambda batch: speeds[batch][0])
    best_int8 = min(speeds, key=lambda batch: speeds[batch][1])
    ratio = speeds[best_fp32][0] / speeds[best_int8][1]
    print(f"\n{label}")
    print(f"  {'batch':>5} {'FP32 ms/film':>13} {'INT8 ms/film':>13} {'FP32/INT8':>10}")
    for batch, (fp32, int8) in speeds.items():
        print(f"  {batch:>5} {fp32:>13.2f} {int8:>13.2f} {fp32 / int8:>9.2f}x")
    print(f"  best batch: FP32 {best_fp32} ({speeds[best_fp32][0]:.2f} ms/film), INT8 {best_int8} "
          f"({speeds[best_int8][1]:.2f} ms/film): INT8 is {ratio:.2f}x FP32")
    return {"model": label, "best_fp32": best_fp32, "best_int8": best_int8, "ratio": round(ratio, 3),
            "ms_per_film": {str(batch): [round(value, 3) for value in pair] for batch, pair in speeds.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per precision, demo model and batch")
    parser.add_argument("--production-rounds", type=int, default=3, help="the same for the 512² stand-ins")
    parser.add_argument("--skip-production", action="store_true", help="demo models only")
    parser.add_argument("--accuracy", type=Path, default=None, help="SIIM-format held-out folder for accuracy")
    parser.add_argument("--accuracy-only", action="store_true", help="no speed measurement")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, intra-op threads {args.threads or 'default'}, "
          f"spinning off (the service's session options)")
    summary: list[dict[str, Any]] = []
    if not args.accuracy_only:
        for label, directory in DEMO.items():
            manifest = load_manifest(directory)
            speeds = compare_speed(directory / manifest.files["onnx"], directory / manifest.files["onnx_int8"],
                                   manifest.input.size, DEMO_BATCHES, args.threads, args.rounds)
            summary.append(_report(label, speeds))
        if not args.skip_production:
            with tempfile.TemporaryDirectory(prefix="ptx-bench-int8-") as folder:
                for label, (fp32, int8) in production_models(Path(folder)).items():
                    speeds = compare_speed(fp32, int8, PRODUCTION_SIZE, PRODUCTION_BATCHES, args.threads,
                                           args.production_rounds)
                    summary.append(_report(label, speeds))
    if args.accuracy is not None:
        from training.data import index_siim
        from training.quantize import compare_precisions

        comparison = compare_precisions(DEMO["demo classifier (R18 w16, 512²)"],
                                        DEMO["demo segmenter (R18 w16 U-Net, 256²)"], index_siim(args.accuracy),
                                        threads=args.threads)
        figures = comparison.summary()
        print(f"\naccuracy on {args.accuracy} ({figures['films']} films, {figures['positives']} positive), "
              f"INT8 vs FP32 cascades:")
        print(json.dumps(figures, indent=1))
        summary.append({"accuracy": figures})
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
