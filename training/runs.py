"""Where a training run lives and what it is: its folder, its identity, and the model it starts from.

Why a run folder per identity: with one folder per config name, "fold 1" found fold 0's `last.pt` and
resumed it, so fold 1's model had trained on fold 1's validation films. A run is now keyed by everything that
defines it (the full config, which holds the fold and the seed, the data fingerprint, and the contents of
any file it starts from), and the trainer refuses a checkpoint written under another identity.

Why each stage has an identity of its own (`stage_identity`, `stage_dir`): keyed by the whole config, a change to
the segmenter's settings gave a new run folder, and the classifier, untouched, trained again (27 minutes of the
demo's 43 on 2 cores). A stage is keyed by what its weights depend on: its own model config, the data and its
split, the seed, the files it starts from, and, for a segmenter whose encoder starts from the classifier, the
classifier stage's identity. Runs that share a stage share its folder, so a finished classifier is resumed to
nothing and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from service.models.manifest import sha256_file
from training import config as configs
from training import distributed
from training.data import CachedSet


def run_identity(config: configs.TrainConfig, cached: CachedSet) -> dict:
    """Everything a run's results depend on, as plain data (stored in its checkpoints)."""
    return {"config": json.loads(json.dumps(configs.to_dict(config))), "fold": config.data.fold,
            "seed": config.seed, "data": cached.directory.name,
            "files": {key: sha256_file(path) for key, path in configs.named_files(config).items()
                      if Path(path).is_file()}}


def run_dir(work: Path, config: configs.TrainConfig, cached: CachedSet) -> Path:
    """`work/<name>/fold<k>-seed<s>-<key>`: readable, and unique to the run's identity."""
    return Path(work) / config.name / f"fold{config.data.fold}-seed{config.seed}-{_key(run_identity(config, cached))}"


def stage_identity(config: configs.TrainConfig, cached: CachedSet, stage: str) -> dict:
    """What one stage's ("classifier" or "segmenter") weights depend on, as plain data (in its checkpoints)."""
    if stage not in ("classifier", "segmenter"):
        raise ValueError(f"stage must be classifier or segmenter, got {stage!r}")
    run = run_identity(config, cached)  # the run's identity, narrowed to what this stage reads
    identity = {"stage": stage, "model": run["config"][stage], "data_config": run["config"]["data"],
                "fold": run["fold"], "seed": run["seed"], "data": run["data"],
                "files": {key: digest for key, digest in run["files"].items() if key.startswith(f"{stage}.")}}
    if stage == "segmenter" and config.segmenter.network.encoder_from_classifier:
        identity["classifier"] = stage_identity(config, cached, "classifier")  # its encoder starts from it
    return identity


def stage_dir(work: Path, config: configs.TrainConfig, cached: CachedSet, stage: str) -> Path:
    """`work/<name>/stages/<stage>-fold<k>-seed<s>-<key>`: one folder per stage identity, shared by the runs that
    train that same stage."""
    key = _key(stage_identity(config, cached, stage))
    return Path(work) / config.name / "stages" / f"{stage}-fold{config.data.fold}-seed{config.seed}-{key}"


def linked_stage(run: Path, stage_folder: Path) -> Path:
    """`stage_folder`, created, and linked from the run as `run/<stage>` (a relative symlink), so a run folder
    still shows its stages' checkpoints; returns `stage_folder`.

    A real `run/<stage>` folder (written before stages had folders of their own) is moved aside to
    `<stage>.before-stages`, not deleted: its checkpoints carry the old identity and would be refused anyway.
    """
    stage = stage_folder.name.split("-", 1)[0]
    link = Path(run) / stage
    if distributed.world().is_main:
        stage_folder.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        elif link.is_dir():
            link.rename(link.with_name(f"{stage}.before-stages"))
        link.symlink_to(os.path.relpath(stage_folder, link.parent), target_is_directory=True)
    return stage_folder


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def cascade_file(init_from: str | Path) -> Path:
    """The `cascade.pt` a stage starts from: the file itself, or the one in a run folder."""
    path = Path(init_from)
    path = path / "cascade.pt" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"init_from: {path} not found (a finished run's folder or its cascade.pt)")
    return path


def init_from_run(model: nn.Module, init_from: str | Path, which: str) -> None:
    """Load `which` ("classifier" or "segmenter") of a previous run into `model`, every tensor or an error.

    The networks are fully convolutional, so a 512 px stage's weights serve a 1024 px stage unchanged.
    """
    path = cascade_file(init_from)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if which not in state:
        raise ValueError(f"init_from: {path} holds no {which} (keys: {', '.join(sorted(state))})")
    try:
        model.load_state_dict(state[which], strict=True)
    except RuntimeError as error:
        raise ValueError(f"init_from: the {which} in {path} does not fit this config's network: {error}") from error

