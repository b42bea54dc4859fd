"""`torchrun --nproc_per_node 2` (gloo, CPU) trains the same steps as one process with the same global batch.

The network is the project's classifier (auxiliary mask head: the task calls `forward_with_mask`, not
`forward`), trained for 3 epochs of 3 steps with the encoder frozen in the first (DDP rebuilt when it is
released) and the top-2 epochs averaged. Its BatchNorm layers are swapped for GroupNorm here: PyTorch has no
CPU SyncBatchNorm, and per-process batch statistics would make the runs differ by design, not by a bug
(training/distributed.py). This file is also the script each torchrun process runs (`__main__` below).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training import distributed
from training.config import from_dict
from training.datasets import RadiographDataset
from training.tasks import build_classifier, classifier_task, input_spec
from training.trainer import fit, seed_everything

REPO = Path(__file__).resolve().parents[2]
SEED = 7


def _batch_independent(module: nn.Module) -> None:
    """BatchNorm → GroupNorm(1, C) in place: normalised per film, so a film's output ignores its batch mates."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            _batch_independent(child)


def train(work: Path, out_dir: Path) -> dict:
    """The run both sides make: the same config, films, seed and initial weights."""
    from tests.training.test_runs import TINY, synthetic_set

    torch.set_num_threads(1)
    base = from_dict(TINY).classifier
    config = dataclasses.replace(base, optim=dataclasses.replace(
        base.optim, epochs=3, batch_size=4, accumulate=2, average_top_k=2, freeze_encoder_epochs=1,
        early_stopping=10))
    cached = synthetic_set(work)
    spec = input_spec(config)
    seed_everything(SEED)
    model = build_classifier(config)
    _batch_independent(model)
    result = fit(model, classifier_task(config, RadiographDataset(cached, np.arange(12, 18), spec)),
                 RadiographDataset(cached, np.arange(12), spec), config, out_dir, SEED, progress=False)
    return {"history": result.history, "images": result.images_seen, "final": result.final_metric,
            "averaged": result.averaged, "state": model.state_dict(), "world": distributed.world().size}


def test_two_processes_train_the_steps_of_one(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), str(tmp_path / "ddp")]
    run = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    one = train(tmp_path / "one", tmp_path / "one" / "run")

    assert [rank["world"] for rank in ranks] == [2, 2] and one["world"] == 1
    for rank in ranks:
        losses = [epoch["loss"] for epoch in rank["history"]]
        assert losses == pytest.approx([epoch["loss"] for epoch in one["history"]], rel=1e-4)
        assert [e["metric"] for e in rank["history"]] == pytest.approx([e["metric"] for e in one["history"]])
        assert (rank["images"], rank["averaged"]) == (one["images"], one["averaged"])
        assert rank["final"] == pytest.approx(one["final"])
        for key, value in one["state"].items():  # per tensor, not per weight: Adam divides by a gradient's
            # RMS, so a weight whose gradient is ~0 moves by lr-sized steps whose sign rounding may flip
            difference = float((rank["state"][key].double() - value.double()).norm())
            assert difference <= 1e-4 * max(float(value.double().norm()), 1.0), key
    assert one["images"] == 3 * 12, "3 epochs of 3 global batches of 4"
    assert losses[0] != losses[-1], "it trained"
    written = {p.name for p in (tmp_path / "ddp" / "run").iterdir()}
    assert written == {p.name for p in (tmp_path / "one" / "run").iterdir()}, "process 0 wrote what one writes"


def test_a_global_batch_is_split_into_shares_of_the_films_one_process_would_take() -> None:
    batches = distributed.global_batches(11, 4, 2)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]], "the partial last batch dropped"
    assert [b.tolist() for b in distributed.global_batches(3, 4, 2)] == [[0, 1, 2]], "unless it is the only one"
    assert [b.tolist() for b in distributed.global_batches(5, 4, 2)] == [[0, 1, 2, 3]]
    shares = [distributed.shard(np.arange(5), distributed.World(rank, 2)) for rank in (0, 1)]
    assert shares == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"batch_size 2 is the global batch .*\(WORLD_SIZE 4\)"):
        distributed.global_batches(10, 2, 4)


if __name__ == "__main__":  # one torchrun process: train, keep what the test compares, leave the group
    out = Path(sys.argv[1])
    current = distributed.world()
    run_dir = out / "run"
    outcome = train(out / f"work{current.rank}", run_dir)
    torch.save(outcome, out / f"rank{current.rank}.pt")
    distributed.close()
