"""Production-sized stand-in models for the serving benchmark: speed only, no accuracy.

    python -m load_tests.stress_models --out data/bench/models-siim --films data/bench/synth-n300-s0-p0.22-1024

The bundled demo models take a few ms per film on a CPU, so a serving benchmark with them measures
DICOM decoding and HTTP, not the serving of models. These are the networks of
`training/configs/siim-gpu.yaml` (ResNet-34 width 64, 512² input; classifier with its auxiliary head, which the
ONNX export leaves out; U-Net with scSE and the full decoder) with seeded random weights, exported through the same
`export_model` as trained models (ONNX, FP16, checks, manifest with hashes).

Thresholds: random weights carry no information, so the classifier's gate and operating point are set to
the 78th percentile of its scores on the benchmark films: 22 % of films go on to the segmenter, the
design's prevalence. The manifests say all this in `intended_use`; never serve them for triage.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from service.cascade.preprocess import to_batch
from service.imaging.reader import read_radiograph
from service.models.inference import classify_scores
from training import config as configs
from training.export import export_model
from training.tasks import build_classifier, build_segmenter, input_spec

REPO = Path(__file__).resolve().parents[1]
INTENDED_USE = ("benchmark only: production-sized networks with RANDOM weights and a gate set to pass 22 % of the "
                "benchmark films; no diagnostic value, never for triage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository to create (must not exist)")
    parser.add_argument("--films", type=Path, required=True, help="benchmark folder with dicom/ (for the gate)")
    parser.add_argument("--config", type=Path, default=REPO / "training/configs/siim-gpu.yaml")
    parser.add_argument("--pass-fraction", type=float, default=0.22)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; refusing to overwrite a model repository", file=sys.stderr)
        return 2
    config = configs.load(args.config)
    torch.manual_seed(args.seed)
    classifier = build_classifier(config.classifier).eval()
    segmenter = build_segmenter(config.segmenter).eval()

    spec = input_spec(config.classifier)
    films = [read_radiograph(path).pixels for path in sorted((args.films / "dicom").glob("*.dcm"))]
    if not films:
        print(f"no DICOMs under {args.films / 'dicom'}", file=sys.stderr)
        return 2

    class _Torch:
        name, provider = "torch-cpu", "cpu"

        def run(self, batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return classifier(torch.from_numpy(batch)).numpy()

    scores = np.concatenate([classify_scores(_Torch(), to_batch(films[i:i + 8], spec), hflip_tta=True)
                             for i in range(0, len(films), 8)])
    gate = float(np.quantile(scores, 1 - args.pass_fraction))
    gate = min(max(gate, 1e-6), 1 - 1e-6)
    print(f"classifier scores on {len(films)} films: min {scores.min():.4f} max {scores.max():.4f}; "
          f"gate {gate:.6f} passes {float(np.mean(scores >= gate)):.2%}")

    common = {"version": "0.0.1-stress", "intended_use": INTENDED_USE, "created": datetime.date.today().isoformat(),
              "training_info": {"command": " ".join(["python -m load_tests.stress_models", *(argv or sys.argv[1:])]),
                                "config": configs.to_dict(config), "seed": args.seed,
                                "data_fingerprint": "random-weights", "git_commit": None},
              "metrics": {}}
    export_model(classifier, args.out / "ptx-classifier-stress" / "0.0.1-stress", name="ptx-classifier-stress",
                 task="classification", input_spec=spec, thresholds={"gate": gate, "operating_point": gate}, **common)
    export_model(segmenter, args.out / "ptx-segmenter-stress" / "0.0.1-stress", name="ptx-segmenter-stress",
                 task="segmentation", input_spec=input_spec(config.segmenter),
                 thresholds={"triplet": {"top_score": 0.75, "min_area": 2000, "bottom_score": 0.3},
                             "min_area_reference_size": 1024}, **common)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
