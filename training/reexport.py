"""Re-export an exported classifier from its own weights: its ONNX files gain the `features` output, its
manifest the out-of-distribution description and, when given, the score fusion (issue 16).

Why not retrain: the weights (model.pt) are what was validated; only the graph around them changes (a second
output) and the statistics beside them are new. The network is rebuilt from the manifest's training config and
its checkpoint (sha256 checked), exported and checked against PyTorch as any export (training/export.py),
its FP16 and INT8 files remade from the new FP32 graph, and the folder replaced only once all of that passed.
Everything the old manifest said about the model -- name, version, thresholds (but a gate the caller moves),
training, metrics, intended use, creation date -- is kept; `export` describes the new files.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import torch

from service.models import manifest as manifests
from service.models.backends.torch_backend import build_network, network_spec
from service.models.fusion import ScoreFusion
from service.models.manifest import Manifest
from training.export import export_model
from training.ood import OodFilms

REAL_INPUTS = 4  # calibration films also checked at export, as the demo's first export did


def load_weights(model_dir: Path, manifest: Manifest) -> torch.nn.Module:
    """The network of `manifest` with its checkpoint, auxiliary head included (a strict load), in eval mode."""
    path = Path(model_dir) / manifest.files["checkpoint"]
    data = path.read_bytes()
    if manifests.sha256_file(path) != manifest.sha256[manifest.files["checkpoint"]]:
        raise manifests.ManifestError(f"{path}: sha256 differs from its manifest: refusing to re-export it")
    members = len(manifests.read_members(Path(model_dir), manifest))  # an ensemble's (training/cv.py), 0 if none
    network = build_network(dataclasses.replace(network_spec(manifest), members=members))
    network.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return network.eval()


def reexport_classifier(model_dir: Path, calibration_inputs: np.ndarray, calibration_description: str,
                        ood_films: OodFilms | None, fusion: ScoreFusion | None = None,
                        gate: float | None = None) -> Manifest:
    """Replace the classifier folder `model_dir` by its re-export (see the module docstring); `gate`, when given,
    replaces the manifest's gate (training/demo_refit.py says when)."""
    model_dir = Path(model_dir)
    old = manifests.load_manifest(model_dir)
    if old.task != "classification":
        raise ValueError(f"{model_dir} holds a {old.task} model: only a classifier has features to re-export")
    network = load_weights(model_dir, old)
    thresholds = old.thresholds if gate is None else old.thresholds.model_copy(update={"gate": float(gate)})
    staged = model_dir.parent / f".{model_dir.name}.reexport"
    if staged.exists():
        shutil.rmtree(staged)
    manifest = export_model(
        network, staged, name=old.name, version=old.version, task=old.task, input_spec=manifests.input_spec(old),
        thresholds=thresholds, training_info=old.training, metrics=old.metrics, intended_use=old.intended_use,
        created=old.created, real_inputs=calibration_inputs[:REAL_INPUTS], calibration_inputs=calibration_inputs,
        calibration_description=calibration_description, ood_films=ood_films, fusion=fusion)
    extra = sorted(set(old.files) - set(manifest.files))
    if extra:  # e.g. an ensemble's member list or the training films' record: carried over, hashes checked
        for role in extra:
            shutil.copy2(model_dir / old.files[role], staged / old.files[role])
        manifest = manifest.model_copy(update={"files": {**manifest.files, **{r: old.files[r] for r in extra}},
                                               "sha256": {**manifest.sha256,
                                                          **{old.files[r]: old.sha256[old.files[r]] for r in extra}}})
        manifests.write_manifest(manifest, staged)
    retired = model_dir.parent / f".{model_dir.name}.retired"
    model_dir.rename(retired)
    staged.rename(model_dir)
    shutil.rmtree(retired)
    return manifests.load_manifest(model_dir)
