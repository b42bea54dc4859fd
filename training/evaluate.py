"""Evaluate exported models on a held-out set exactly as the service runs them.

Films either model was trained or tuned on are refused before anything runs (`training.films`).

The models are loaded through their manifests (hash-checked), run by the service's ONNX Runtime backend
inside the service's `Cascade`, on films decoded by `read_radiograph` at their full resolution; the masks
are compared with the ground truth at that resolution. TTA on and off are both measured: the second run
is the whole cascade without the mirrored passes (classifier and segmenter), so its gating may differ.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.cascade import rle
from service.cascade.in_process import Cascade
from service.cascade.preprocess import resize
from service.cascade.scoring import DEFAULT_PREVALENCE, Scoring
from service.imaging.reader import read_radiograph
from service.models import manifest as manifests
from service.models.backends.onnxruntime_cpu import OnnxRuntimeCPU
from service.models.ood import OodModel
from training.cascade_outputs import CascadeOutputs
from training.data import Sample
from training.films import refuse_overlap
from training.report import summarise, write_report

CALIBRATED_SCORE_DEFINITION = (
    "The triage score is the classifier's probability (sigmoid of its logit, averaged with the same for the "
    "mirrored film: hflip TTA), calibrated on the validation fold (Platt scaling; the classifier's manifest holds "
    "it as a `fusion` whose one input is the classifier's logit) and moved to the prevalence the service is "
    "configured with (prior shift). Both steps are monotone and the operating point is the classifier's own, "
    "calibrated, so exactly the films the classifier's probability would flag are flagged; the segmenter shapes "
    "the mask of the films the classifier's gate sends it."
)
FUSED_SCORE_DEFINITION = (
    "The triage score is the calibrated fusion of the classifier's probability (with hflip TTA) and the "
    "segmenter's evidence -- the peak of its map and the area of the largest instance after the triplet rule, "
    "both 0 for a film the gate did not send -- a logistic model fitted on the validation fold and stored in the "
    "classifier's manifest, moved to the prevalence the service is configured with (prior shift)."
)
SCORE_DEFINITION = (
    "The triage score is the classifier's probability (sigmoid of its logit) for 'pneumothorax present', "
    "computed on the whole film at the classifier's input size and averaged with the same for the mirrored "
    "film (hflip TTA). The classifier was trained with an "
    "auxiliary segmentation head (multi-task), so its image-level score is learned from pixel-level "
    "evidence; the head itself is not used at inference. The segmenter only shapes the mask."
)


def load_cascade(classifier_dir: Path, segmenter_dir: Path, hflip_tta: bool = True, threads: int = 0,
                 prevalence: float | None = DEFAULT_PREVALENCE) -> tuple[Cascade, dict[str, Any]]:
    """A `Cascade` over the ONNX files of two model-repository entries, thresholds, score fusion and OOD
    description from their manifests; `prevalence` the site's (the service's default PTX_PREVALENCE)."""
    cls = manifests.load_manifest(classifier_dir)
    seg = manifests.load_manifest(segmenter_dir)
    if cls.task != "classification" or seg.task != "segmentation":
        raise ValueError(f"expected a classifier and a segmenter, got {cls.task} and {seg.task}")
    cascade = Cascade(
        classifier=OnnxRuntimeCPU(Path(classifier_dir) / cls.files["onnx"], intra_op_threads=threads),
        classifier_spec=manifests.input_spec(cls),
        segmenter=OnnxRuntimeCPU(Path(segmenter_dir) / seg.files["onnx"], intra_op_threads=threads),
        segmenter_spec=manifests.input_spec(seg),
        gate=cls.thresholds.gate,
        operating_point=cls.thresholds.operating_point,
        triplet=manifests.triplet(seg),
        triplet_reference_size=seg.thresholds.min_area_reference_size,
        hflip_tta=hflip_tta,
        fusion=cls.fusion,
        ood=None if cls.ood is None else OodModel.from_statistics(cls.ood),
        prevalence=prevalence,
    )
    info = {"classifier": f"{cls.name} {cls.version}", "segmenter": f"{seg.name} {seg.version}"}
    return cascade, info


def run(cascade: Cascade, samples: Sequence[Sample], batch_size: int = 8, overlay_size: int = 256,
        progress: bool = True) -> tuple[CascadeOutputs, float]:
    """The cascade over `samples`, and the masks of the same cascade without TTA; the scores reported are
    the served ones (with TTA). Returns the outputs and seconds per film (both runs, decoding once)."""
    without_tta = dataclasses.replace(cascade, hflip_tta=False)
    labels, scores, classifier_scores, gated, truths, with_tta, no_tta, overlays = [], [], [], [], [], [], [], []
    started = time.perf_counter()
    chunks = range(0, len(samples), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="evaluate", unit="batch")
    for start in chunks:
        batch = samples[start : start + batch_size]
        films = [read_radiograph(sample.path).pixels for sample in batch]
        results = cascade.run(films)
        plain = without_tta.run(films)
        for sample, film, result, result_plain in zip(batch, films, results, plain):
            truth = rle.decode_union(sample.rles, *film.shape)
            labels.append(int(truth.any()))
            scores.append(result.score)
            classifier_scores.append(result.score if result.classifier_score is None else result.classifier_score)
            gated.append(result.gated)
            truths.append(truth)
            with_tta.append(result.mask)
            no_tta.append(result_plain.mask)
            overlays.append(resize(film, overlay_size, overlay_size))
    seconds = (time.perf_counter() - started) / max(1, len(samples))
    outputs = CascadeOutputs(
        image_ids=[sample.image_id for sample in samples],
        labels=np.asarray(labels),
        scores=np.asarray(scores),
        classifier_scores=np.asarray(classifier_scores),
        gated=np.asarray(gated, dtype=bool),
        masks_true=truths,
        masks_pred=with_tta,
        threshold=Scoring(cascade.fusion, cascade.prevalence).operating_point(cascade.operating_point),
        gate_threshold=cascade.gate,
        triplet=cascade.triplet,
        masks_pred_no_tta=no_tta,
        images=overlays,
    )
    return outputs, seconds


def evaluate(classifier_dir: Path, segmenter_dir: Path, samples: Sequence[Sample], out_dir: Path,
             title: str, data_description: str, progress: bool = True,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run, summarise and write `report.json` + `report.md` (with plots) into `out_dir`; return the summary.
    `extra`: further sections of the summary (e.g. `score_ablation`, training/demo_report.py).

    Refuses (DataError) films that either model was trained or tuned on, by their recorded keys (`films`).
    """
    unchecked = refuse_overlap([classifier_dir, segmenter_dir], samples)
    cascade, info = load_cascade(classifier_dir, segmenter_dir)
    info["training_films_overlap"] = (f"not checked for {' and '.join(unchecked)} (no training-films record)"
                                      if unchecked else "none (checked against both models' training films)")
    outputs, seconds = run(cascade, samples, progress=progress)
    definition = (SCORE_DEFINITION if cascade.fusion is None else
                  FUSED_SCORE_DEFINITION if cascade.fusion.uses_segmenter else CALIBRATED_SCORE_DEFINITION)
    info.update({"score_definition": definition,
                 "data": data_description,
                 "seconds_per_film_cpu_with_and_without_tta": round(seconds, 4)})
    outputs = dataclasses.replace(outputs, info=info)
    summary = {**summarise(outputs), **(extra or {})}
    write_report(outputs, summary, out_dir, title)
    return summary
