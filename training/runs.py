"""Where a training run lives and what it is: its folder, its identity, and the model it starts from.

Why a run folder per identity: with one folder per config name, "fold 1" found fold 0's `last.pt` and
resumed it, so fold 1's model had trained on fold 1's validation films. A run is now keyed by everything that
defines it (the full config, which holds the fold and the seed, the data fingerprint, and the contents of
any file it starts from), and the trainer refuses a checkpoint written under another identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from service.models.manifest import sha256_file
from training import config as configs
from training.data import CachedSet


def run_identity(config: configs.TrainConfig, cached: CachedSet) -> dict:
    """Everything a run's results depend on, as plain data (stored in its checkpoints)."""
    return {"config": json.loads(json.dumps(configs.to_dict(config))), "fold": config.data.fold,
            "seed": config.seed, "data": cached.directory.name,
            "files": {key: sha256_file(path) for key, path in configs.named_files(config).items()
                      if Path(path).is_file()}}


def run_dir(work: Path, config: configs.TrainConfig, cached: CachedSet) -> Path:
    """`work/<name>/fold<k>-seed<s>-<key>`: readable, and unique to the run's identity."""
    key = hashlib.sha256(json.dumps(run_identity(config, cached), sort_keys=True).encode()).hexdigest()[:10]
    return Path(work) / config.name / f"fold{config.data.fold}-seed{config.seed}-{key}"


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

