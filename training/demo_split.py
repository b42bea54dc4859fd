"""The demo's training set split into its folds without rendering it: which films trained the demo models, which
validated them.

Why: the out-of-distribution statistics and the score fusion are fitted after the demo models were trained
(issue 16), on the demo's own films -- the statistics on training-fold films, the threshold and the fusion on
the validation fold, which neither model trained on -- and never on test films. Rendering and caching all
4000 films again to learn the fold of each costs half an hour on 2 cores; the folds depend only on each film's
label, patient and image id, which the generator knows without rendering (`case_positive`, `patient_id`,
`uid_for`). The same `assign_folds` then gives the split `folds_of` gave the training run, so any prefix of the
set (`python -m training synth --count N --seed <training seed> --prevalence <training prevalence>
--uncompressed` renders the first N films exactly) can be sorted into its folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import TrainConfig
from training.data import HELD_OUT, assign_folds, patient_group
from training.synth.dicom_writer import patient_id, uid_for
from training.synth.generate import SynthConfig, case_positive


@dataclass(frozen=True)
class DemoSplit:
    """Image id → fold of the demo's training set; `validation` is the fold its thresholds were chosen on."""

    folds: dict[str, int]
    validation: int

    def role(self, image_id: str) -> str:
        """"train", "validation" or "held_out" (a film of no fold); KeyError for a film not of this set."""
        fold = self.folds[image_id]
        return "held_out" if fold == HELD_OUT else "validation" if fold == self.validation else "train"

    def films(self, paths: list[Path], role: str) -> list[Path]:
        """The DICOM files among `paths` (named <image id>.dcm) whose film has `role`, in name order."""
        unknown = [path.name for path in paths if path.stem not in self.folds]
        if unknown:
            raise ValueError(f"{len(unknown)} file(s) are not films of the demo's training set, e.g. {unknown[:2]}")
        return sorted((path for path in paths if self.role(path.stem) == role), key=lambda path: path.name)


def demo_split(config: TrainConfig) -> DemoSplit:
    """The folds of `config.demo`'s training set as `training.train.folds_of` assigned them (films sorted by image
    id, as `index_siim` and the cache order them)."""
    demo = config.demo
    synth = SynthConfig(out=Path("."), count=demo.train_images, seed=config.seed, prevalence=demo.train_prevalence,
                        size=demo.image_size, uncompressed=True)
    films = sorted((str(uid_for(config.seed, index, "sop")), case_positive(synth, index),
                    patient_group(patient_id(config.seed, index))) for index in range(demo.train_images))
    labels = np.asarray([positive for _, positive, _ in films], dtype=np.uint8)
    folds = assign_folds(labels, [group for _, _, group in films], config.data.folds, config.seed, config.data.holdout)
    return DemoSplit({image_id: int(fold) for (image_id, _, _), fold in zip(films, folds, strict=True)},
                     config.data.fold)
