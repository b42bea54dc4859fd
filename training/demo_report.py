"""`python -m training demo-report`: the demo report (docs/demo-report/) of the bundled models on a test set, with
the section on what the triage score is made of (issue 16: training/fusion_report.py).

    films of the demo's training set (a prefix, as for refit-demo) → their validation fold (training/demo_split.py)
    test films (a synth folder never used for training: the demo's own is seed 9001)
      both, through the in-process cascade with the segmenter on every film (gate 0) → the evidence of the
      classifier and the segmenter (training/fusion.py), and the classifier's auxiliary head read from its
      checkpoint (training/aux_evidence.py) → the ablation, fitted on the validation films, measured on the test
    the test films through the cascade as served → the report (training/evaluate.py), the ablation a section of it

Why the segmenter on every film: the rows that model a gate zero the evidence of the films it would not send,
and one row shows what the segmenter knows of the films the classifier's gate skips.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from service.cascade.scoring import DEFAULT_PREVALENCE
from service.models import manifest as manifests
from training import config as configs
from training.aux_evidence import aux_evidence
from training.data import index_siim
from training.demo_split import demo_split
from training.evaluate import evaluate, load_cascade
from training.films import refuse_overlap
from training.fusion import collect_evidence
from training.fusion_report import fusion_report
from training.reexport import load_weights


def describe(folder: Path) -> str:
    """A synth folder in words, from its synth.json (the folder's name where it has none)."""
    path = Path(folder) / "synth.json"
    if not path.is_file():
        return str(folder)
    options = json.loads(path.read_text(encoding="utf-8"))["options"]
    return (f"{options['count']} synthetic films, seed {options['seed']}, prevalence {options['prevalence']}, "
            f"{options['size']} px, {options.get('difficulty', 'realistic')} difficulty, "
            f"{'uncompressed' if options.get('uncompressed') else 'mixed encodings'}")


def demo_report(config_path: Path, models_root: Path, films_dir: Path, test_dir: Path, report_dir: Path,
                progress: bool = True) -> dict[str, Any]:
    """Write the report (see the module docstring) into `report_dir`; returns its summary."""
    config = configs.load(config_path)
    classifier_dir = Path(models_root) / f"ptx-classifier-{config.name}" / config.version
    segmenter_dir = Path(models_root) / f"ptx-segmenter-{config.name}" / config.version
    tests = index_siim(test_dir)
    refuse_overlap([classifier_dir, segmenter_dir], tests)  # before anything costly
    training = {sample.image_id: sample for sample in index_siim(films_dir)}
    validation = demo_split(config).films(sorted(sample.path for sample in training.values()), "validation")
    cascade, _ = load_cascade(classifier_dir, segmenter_dir)
    every_film = dataclasses.replace(cascade, gate=0.0)
    classifier = manifests.load_manifest(classifier_dir)
    network = load_weights(classifier_dir, classifier)
    evidence, aux = {}, {}
    for role, films, labels in (("validation", validation, [bool(training[p.stem].rles) for p in validation]),
                                ("test", [s.path for s in tests], [bool(s.rles) for s in tests])):
        evidence[role] = collect_evidence(every_film, films, [int(label) for label in labels])
        aux[role] = aux_evidence(network, films, manifests.input_spec(classifier), cascade.hflip_tta)
    served = "fused" if classifier.fusion is not None and classifier.fusion.uses_segmenter else "calibrated"
    ablation = fusion_report(evidence["validation"], evidence["test"], cascade.gate, cascade.operating_point,
                             aux["validation"], aux["test"], DEFAULT_PREVALENCE, config.evaluation.target_sensitivity,
                             served=served)
    return evaluate(classifier_dir, segmenter_dir, tests, report_dir, f"Demo cascade {config.version}",
                    describe(test_dir), progress=progress, extra={"score_ablation": ablation})
