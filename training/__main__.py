"""`python -m training <command>`: synth, train, cv, export, evaluate, demo, quantize, refit-demo, demo-report.

Each command adds a `_add_<name>(subparsers)` function that sets `handler`; `main` stays the same. Bad
arguments and unusable data give one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def _command_line(argv: list[str] | None) -> str:
    return "python -m training " + " ".join(sys.argv[1:] if argv is None else argv)


def _cache_size(config) -> int:
    """One cache serves both models: the larger input size (the smaller model resizes from it)."""
    return max(config.classifier.input.size, config.segmenter.input.size)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the classifier and the segmenter, choose thresholds, export",
                              description="Train both models on one fold split of a SIIM-format or PNG folder, "
                                          "choose thresholds on the validation fold, export ONNX + manifests.")
    p.add_argument("--config", type=Path, required=True, help="YAML config (see training/configs/)")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: data.folder in the config)")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models", help="model repository to export into")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "runs",
                   help="runs go to WORK/<name>/fold<k>-seed<s>-<key>, one folder per config, fold, seed and data")
    p.add_argument("--fold", type=_int_at_least(0), default=None, help="validation fold (default: data.fold)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="staged training: start both models from this earlier run's folder (sets init_from)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_train)


def _config_and_cache(args: argparse.Namespace, command: str, progress: bool):
    """The run's config and its data cache, or a one-line usage error naming what is wrong."""
    from training import config as configs
    from training.data import DataError, build_cache, index_folder

    try:
        config = configs.load(args.config)
        if getattr(args, "fold", None) is not None:
            if args.fold >= config.data.folds:
                raise ValueError(f"--fold {args.fold} is not one of the {config.data.folds} folds (data.folds)")
            config = dataclasses.replace(config, data=dataclasses.replace(config.data, fold=args.fold))
        if getattr(args, "init_from", None) is not None:
            config = dataclasses.replace(
                config, classifier=dataclasses.replace(config.classifier, init_from=str(args.init_from)),
                segmenter=dataclasses.replace(config.segmenter, init_from=str(args.init_from)))
        configs.check_files(config)
        folder = args.data or Path(config.data.folder)
        return config, build_cache(index_folder(folder), _cache_size(config), Path(config.data.cache),
                                   progress=progress)
    except (DataError, ValueError) as exc:
        raise UsageError(f"training {command}: error: {exc}") from None


def _export(trained, config, cached, models: Path) -> int:
    from training.demo import export_cascade

    directories = export_cascade(trained, config, models, _command_line(None), cached)
    print(f"exported {directories['classification']} and {directories['segmentation']}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from training import distributed
    from training.runs import run_dir
    from training.train import train_cascade

    with distributed.main_first():  # under torchrun: process 0 builds the data cache, the others then read it
        config, cached = _config_and_cache(args, "train", progress=not args.quiet)
    out = run_dir(args.work, config, cached)
    print(f"run folder {out}", flush=True)
    try:
        trained = train_cascade(config, cached, out, progress=not args.quiet, stages=args.work)
    except ValueError as exc:  # a refused resume, a file that does not fit the network
        raise UsageError(f"training train: error: {exc}") from None
    try:
        return _export(trained, config, cached, args.models) if distributed.world().is_main else 0
    finally:
        distributed.close()


def _add_cv(subparsers) -> None:
    p = subparsers.add_parser("cv", help="every fold through every stage, out-of-fold thresholds, an ensemble, "
                                         "evaluated on the held-out films",
                              description="Train each fold through the stages given (each --config in order; a "
                                          "fold's stage N starts from its stage N-1 run), choose thresholds on "
                                          "out-of-fold predictions, export one ensemble of the fold models (ONNX, "
                                          "manifests, members.json) and evaluate it on the held-out films "
                                          "(data.holdout). Resumable: finished runs are loaded, interrupted ones "
                                          "resume.")
    p.add_argument("--config", type=Path, action="append", required=True,
                   help="a stage's YAML config; repeat for each stage, in order")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: data.folder of the first stage)")
    p.add_argument("--cache", type=Path, default=None, help="data cache root (default: data.cache of each stage)")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models", help="model repository to export into")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "runs",
                   help="runs go to WORK/<stage name>/fold<k>-seed<s>-<key>, as `train` puts them")
    p.add_argument("--report", type=Path, default=None,
                   help="held-out evaluation report folder (default: WORK/<name>/holdout-report)")
    p.add_argument("--name", default=None,
                   help="exported as ptx-classifier-NAME and ptx-segmenter-NAME (default: <last stage name>-ensemble)")
    p.add_argument("--fold", type=_int_at_least(0), action="append", default=[],
                   help="train only this fold (repeatable) and stop: no thresholds, export or evaluation; a later "
                        "plain `cv` picks the finished runs up")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    from service.models.manifest import ManifestError
    from training.cv import run_cv
    from training.data import DataError

    try:
        result = run_cv(args.config, args.data, args.cache, args.work, args.models, args.report, args.name,
                        args.fold, _command_line(None), progress=not args.quiet)
    except (DataError, ManifestError, ValueError) as exc:
        raise UsageError(f"training cv: error: {exc}") from None
    print(json.dumps(result, indent=1, default=str))
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="re-export a finished training run (ONNX, FP16, manifests)")
    p.add_argument("--config", type=Path, required=True, help="the run's YAML config")
    p.add_argument("--run", type=Path, required=True, help="the run folder holding cascade.pt")
    p.add_argument("--data", type=Path, default=None, help="its data folder (for the fingerprint and real inputs)")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models", help="model repository to export into")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from training import train

    if not (args.run / "cascade.pt").is_file():
        raise UsageError(f"training export: error: {args.run / 'cascade.pt'} not found: "
                         "is this a finished `train` run?")
    config, cached = _config_and_cache(args, "export", progress=False)
    return _export(train.load(args.run / "cascade.pt", config), config, cached, args.models)


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate",
                              help="evaluate exported models on a SIIM-format folder as the service runs them")
    p.add_argument("--classifier", type=Path, required=True, help="models/<classifier>/<version>")
    p.add_argument("--segmenter", type=Path, required=True, help="models/<segmenter>/<version>")
    p.add_argument("--data", type=Path, required=True, help="SIIM-format folder (dicom/ + train-rle.csv)")
    p.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md, plots)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from service.models.manifest import ManifestError
    from training.data import DataError, index_siim
    from training.evaluate import evaluate

    try:
        samples = index_siim(args.data)
        summary = evaluate(args.classifier, args.segmenter, samples, args.out, f"Evaluation on {args.data.name}",
                           str(args.data), progress=not args.quiet)
    except (DataError, ManifestError, ValueError) as exc:
        raise UsageError(f"training evaluate: error: {exc}") from None
    print(json.dumps({"triage": summary["triage"], "segmentation": summary["segmentation"]["cascade"]}, indent=1))
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate synthetic data, train, export and evaluate the demo models",
                              description="The bundled demo models in one command: train, export, refit, report.")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "training" / "configs" / "demo.yaml")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "data" / "demo", help="synthetic data, cache, runs")
    p.add_argument("--report", type=Path, default=REPO_ROOT / "docs" / "demo-report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    try:
        result = run_demo(args.config, args.models, args.work, args.report, _command_line(None),
                          progress=not args.quiet)
    except ValueError as exc:
        raise UsageError(f"training demo: error: {exc}") from None
    summary = result["summary"]
    print(json.dumps({"models": result["models"], "timings_s": result["timings"], "triage": summary["triage"],
                      "gate": summary["gate"], "segmentation": summary["segmentation"]}, indent=1, default=str))
    return 0


def _add_quantize(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="add the INT8 (static QDQ, CPU) variant to exported model folders",
                              description="Calibrate on training films (e.g. `synth` with the training seed; never "
                                          "test films), check against the FP32 file, write model.int8.onnx and list "
                                          "it, with its sha256 and the calibration, in each manifest.")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="models/<name>/<version> (repeat for both models)")
    p.add_argument("--films", type=Path, required=True, help="calibration films: the DICOM files under this folder")
    p.add_argument("--count", type=_int_at_least(1), default=128, help="calibrate on the first N films by name")
    p.add_argument("--description", required=True, help="which films these are (recorded in the manifest)")
    p.add_argument("--replace", action="store_true", help="redo an INT8 file the manifest already lists")
    p.set_defaults(handler=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from service.models.manifest import ManifestError
    from training.export import add_int8
    from training.quantize import QuantizationCheckError

    films = sorted(args.films.rglob("*.dcm"))[: args.count]
    if not films:
        raise UsageError(f"training quantize: error: no .dcm files under {args.films}")
    description = f"{args.description} ({len(films)} films: {_command_line(None)})"
    for model in args.model:
        try:
            int8 = add_int8(model, films, description, replace=args.replace).export.int8
        except (ManifestError, QuantizationCheckError, ValueError) as exc:
            raise UsageError(f"training quantize: error: {exc}") from None
        print(f"{model}: model.int8.onnx, mean |p_int8 - p_fp32| {int8.mean_abs_error:.4f} "
              f"(max {int8.max_abs_error:.4f}) on {int8.calibration.films} calibration films")
    return 0


def _add_refit_demo(subparsers) -> None:
    p = subparsers.add_parser("refit-demo", help="re-export the demo classifier with its OOD description and score "
                                                 "calibration, from its weights and its own training films",
                              description="Sort films of the demo's training set (synth with the training seed and "
                                          "prevalence, --uncompressed) into their folds, fit the out-of-distribution "
                                          "statistics on the training folds and their threshold and the score's "
                                          "calibration on the validation fold, and replace the classifier folder by "
                                          "its re-export (FP32, FP16, INT8 files; same weights). Never test films.")
    p.add_argument("--films", type=Path, required=True, help="a synth folder of the demo's training set (a prefix)")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "training" / "configs" / "demo.yaml")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--score", choices=["fused", "calibrated", "classifier"], default="fused",
                   help="the triage score: fused with the segmenter's evidence (default); the classifier's probability "
                        "calibrated, decisions kept; or the classifier's probability as is (OOD description only)")
    p.set_defaults(handler=_run_refit_demo)


def _run_refit_demo(args: argparse.Namespace) -> int:
    from service.models.manifest import ManifestError
    from training.data import DataError
    from training.demo_refit import refit_demo

    try:
        result = refit_demo(args.config, args.models, args.films, score=args.score)
    except (DataError, ManifestError, ValueError) as exc:
        raise UsageError(f"training refit-demo: error: {exc}") from None
    print(json.dumps(result, indent=1))
    return 0


def _add_demo_report(subparsers) -> None:
    p = subparsers.add_parser("demo-report", help="the demo models' report on a test set, with the ablation of "
                                                  "the triage score's evidence (issue 16)")
    p.add_argument("--films", type=Path, required=True, help="the demo's training set (a prefix, as for refit-demo)")
    p.add_argument("--test", type=Path, required=True, help="test films (the demo's own: synth seed 9001, 600 films)")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "training" / "configs" / "demo.yaml")
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--report", type=Path, default=REPO_ROOT / "docs" / "demo-report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_run_demo_report)


def _run_demo_report(args: argparse.Namespace) -> int:
    from service.models.manifest import ManifestError
    from training.data import DataError
    from training.demo_report import demo_report

    try:
        summary = demo_report(args.config, args.models, args.films, args.test, args.report, not args.quiet)
    except (DataError, ManifestError, ValueError) as exc:
        raise UsageError(f"training demo-report: error: {exc}") from None
    print(json.dumps({"triage": summary["triage"], "gate": summary["gate"]}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_synth, _add_train, _add_cv, _add_export, _add_evaluate, _add_demo, _add_quantize, _add_refit_demo,
                _add_demo_report):
        add(subparsers)
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
