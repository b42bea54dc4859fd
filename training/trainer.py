"""One training loop for both models: the model-specific parts come in as a `Task`.

What it does, and why each piece is there:
* AdamW with a cosine or one-cycle schedule, gradient accumulation (large effective batches on small
  memory), AMP on CUDA (FP16 math where it is safe, never on CPU where it is slower);
* validation after every epoch, early stopping on the validation metric, and a wall-clock budget (the demo
  must finish on a 2-core CPU in a fixed time);
* the weights of the best `k` epochs averaged at the end (the SIIM winner's checkpoint averaging, a cheap
  SWA): kept only if the average validates at least as well as the best single epoch;
* a resumable checkpoint after every epoch (model, optimiser, schedule, AMP scaler, CPU and CUDA RNG states,
  history, whether the run stopped), refused unless the run's identity (config, fold, seed, data, training
  films) is the same; a finished or early-stopped run resumes to nothing, it never trains one more epoch;
* staged training: the encoder frozen for the first epochs, gradient-norm clipping;
* seeded determinism: the same seed on the same machine gives the same weights (on CUDA, with
  `optim.deterministic`, also deterministic kernels);
* several processes under `torchrun` (`training.distributed`): `optim.batch_size` is the global batch, each
  process trains on its share under DistributedDataParallel, process 0 decides and writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import distributed
from training.config import ModelConfig
from training.datasets import RadiographDataset, epoch_indices, positive_rate


@dataclass
class Task:
    """The model-specific parts: the loss of a batch and the validation metric (higher is better)."""

    name: str
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Callable[[nn.Module], float]
    metric_name: str


@dataclass
class FitResult:
    best_metric: float
    final_metric: float
    averaged: bool
    epochs: int
    images_seen: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    trained_on: list[int] = field(default_factory=list)  # dataset positions the model was trained on


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic CUDA kernels where asked (reproducible, slower); otherwise let cuDNN benchmark.

    cuBLAS needs its workspace fixed before the first call for deterministic results, hence the variable;
    an operation with no deterministic kernel then raises instead of quietly varying between runs.
    """
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic)


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or release) `model.encoder`: no gradients, and BatchNorm statistics kept as loaded."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError("optim.freeze_encoder_epochs needs a model with an `encoder`")
    for parameter in encoder.parameters():
        parameter.requires_grad_(not frozen)
    encoder.train(not frozen and model.training)


def _schedule(optimiser: torch.optim.Optimizer, kind: str, total_steps: int, lr: float):
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(total_steps, 1))
    if kind == "cosine":
        warmup = max(1, total_steps // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)


def _reseed_worker(seed: int, epoch: int) -> Callable[[int], None]:
    """Give each DataLoader worker's copy of the augmentation pipeline its own, repeatable stream."""

    def init(worker: int) -> None:
        info = torch.utils.data.get_worker_info()
        pipeline = getattr(info.dataset, "pipeline", None) if info else None
        if pipeline is not None:
            pipeline.set_random_seed(seed * 1000 + epoch * 100 + worker)

    return init


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of floating-point tensors (weights and BatchNorm statistics); integer counters from the first."""
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            averaged[key] = torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


def run_fingerprint(config: ModelConfig, seed: int, identity: dict | None, pool: np.ndarray) -> str:
    """What a checkpoint must match to be resumed: the model config, the seed, the caller's identity (full
    config, fold, data fingerprint) and the training films themselves, so no fold resumes another's run."""
    return json.dumps({"model": repr(config), "seed": seed, "identity": identity or {},
                       "train": [int(i) for i in np.sort(pool)]}, sort_keys=True, default=str)


def fit(model: nn.Module, task: Task, dataset: RadiographDataset, config: ModelConfig, out_dir: Path,
        seed: int, device: torch.device | None = None, progress: bool = True,
        identity: dict | None = None) -> FitResult:
    """Train `model` on `dataset` (its `indices` are the training pool) and leave the chosen weights in it.

    `identity` is what else defines the run (the full config, fold, data fingerprint, initialisation):
    a `last.pt` written under another identity is refused, never resumed.
    """
    world = distributed.world()
    device = device or world.device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optim = config.optim
    seed_everything(seed)
    set_determinism(optim.deterministic, device)
    given, model = model, distributed.prepare(model, world)  # a SyncBatchNorm copy on several GPUs
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    steps_per_epoch = math.ceil(len(dataset) / optim.batch_size / optim.accumulate)
    scheduler = _schedule(optimiser, optim.schedule, steps_per_epoch * optim.epochs, optim.lr)
    use_amp = optim.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rng = np.random.default_rng(seed)
    labels = dataset.cached.labels
    pool = dataset.indices.copy()
    history: list[dict[str, float]] = []
    kept: list[tuple[float, int]] = []  # (metric, epoch) of the checkpoints kept for averaging
    start_epoch, images_seen, started, stopped = 0, 0, time.monotonic(), False
    trained_on: set[int] = set()  # dataset positions the training loader was given: the run's audit trail
    checkpoint = out_dir / "last.pt"
    fingerprint = run_fingerprint(config, seed, identity, pool)
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("config") != fingerprint:
            raise ValueError(f"{checkpoint} belongs to a run with another configuration, fold, seed or data; "
                             "resume only the same run, or start in a new folder")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_epoch, history, kept, images_seen = state["epoch"] + 1, state["history"], state["kept"], state["images"]
        stopped, trained_on = state["stopped"], set(state["trained_on"])
    best = max((m for m, _ in kept), default=-math.inf)
    # A resumed run's seconds go on from its history's: a finished run resumed to nothing reported ~0 s of training
    # in its manifest. The budget (`minutes`) still counts this process only.
    earlier_s = history[-1]["seconds"] if history else 0.0
    stale = 0  # epochs since the best one; a resumed run recounts it from its history
    for entry in history:
        stale = 0 if entry["metric"] >= entry["best"] else stale + 1
    for epoch in range(start_epoch, optim.epochs if not stopped else start_epoch):
        rate = positive_rate(config.sampling, epoch / max(1, optim.epochs - 1))
        order = epoch_indices(labels, pool, rate, rng)
        trained_on.update(int(i) for i in order)
        view = RadiographDataset(dataset.cached, order, dataset.spec, dataset.pipeline)
        batches = distributed.global_batches(len(view), optim.batch_size, world.size)
        loader = DataLoader(view, batch_sampler=[distributed.shard(batch, world) for batch in batches],
                            num_workers=optim.workers, worker_init_fn=_reseed_worker(seed, epoch))
        model.train()
        if optim.freeze_encoder_epochs:
            set_encoder_frozen(model, epoch < optim.freeze_encoder_epochs)
        step_module = distributed.wrap(model, task.loss, world)  # after freezing: DDP takes what needs gradients
        running, batches_run = 0.0, 0
        bar = loader
        if progress and world.is_main:
            from tqdm import tqdm

            bar = tqdm(loader, desc=f"{task.name} {epoch + 1}/{optim.epochs}", unit="batch", leave=False)
        optimiser.zero_grad(set_to_none=True)
        for step, ((images, masks, targets), batch) in enumerate(zip(bar, batches, strict=True)):
            images, masks, targets = images.to(device), masks.to(device), targets.to(device)
            # This process's share of the global batch's mean: DDP averages over processes, so a share of
            # n of the batch's N films counts n * size / N (1 when the shares are equal, or on one process).
            share = len(images) * world.size / len(batch)
            stepping = (step + 1) % optim.accumulate == 0 or step + 1 == len(loader)
            with distributed.accumulating(step_module, stepping):
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss = step_module(images, masks, targets) * share / optim.accumulate
                scaler.scale(loss).backward()
            if stepping:
                if optim.clip_grad_norm is not None:
                    scaler.unscale_(optimiser)  # clip the true gradients, not the loss-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad_norm)
                scaler.step(optimiser)
                scaler.update()
                optimiser.zero_grad(set_to_none=True)
                scheduler.step()
            running += distributed.mean(loss.detach()) * optim.accumulate  # the global batch's loss
            batches_run += 1
            images_seen += len(batch)
            if bar is not loader:
                bar.set_postfix(loss=f"{running / batches_run:.4f}")
        model.eval()
        metric = float(distributed.from_main(float(task.validate(model))))
        if world.is_main:
            torch.save(copy.deepcopy(model.state_dict()), out_dir / f"epoch{epoch:03d}.pt")
        kept = sorted(kept + [(metric, epoch)], reverse=True)
        for _, dropped in kept[optim.average_top_k :]:
            if world.is_main:
                (out_dir / f"epoch{dropped:03d}.pt").unlink(missing_ok=True)
        kept = kept[: optim.average_top_k]
        stale = 0 if metric > best else stale + 1
        best = max(best, metric)
        history.append({"epoch": epoch, "loss": running / max(1, batches_run), "metric": metric, "best": best,
                        "positive_rate": rate if rate is not None else float(labels[pool].mean()),
                        "seconds": earlier_s + time.monotonic() - started})
        if world.is_main:
            print(f"{task.name} epoch {epoch + 1}: loss {running / max(1, batches_run):.4f} {task.metric_name} "
                  f"{metric:.4f} (best {best:.4f}) {earlier_s + time.monotonic() - started:.0f}s", flush=True)
        over_time = optim.minutes is not None and time.monotonic() - started > optim.minutes * 60
        stopped = bool(distributed.from_main(stale >= optim.early_stopping or over_time))  # one clock decides
        if world.is_main:
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                        "epoch": epoch, "history": history, "kept": kept, "images": images_seen,
                        "stopped": stopped, "trained_on": sorted(trained_on), "config": fingerprint}, checkpoint)
        if stopped:
            break
    if optim.freeze_encoder_epochs:
        set_encoder_frozen(model, False)  # a run shorter than its warm-up still hands back a trainable model
    distributed.barrier()  # process 0's epoch files are written before anyone reads them
    result = _finish(model, task, out_dir, kept, history, images_seen, earlier_s + time.monotonic() - started, device)
    result.trained_on = sorted(trained_on)
    if model is not given:
        given.load_state_dict(model.state_dict())  # the caller's own modules (BatchNorm, not SyncBatchNorm)
        given.eval()
    return result


def _finish(model: nn.Module, task: Task, out_dir: Path, kept: list[tuple[float, int]],
            history: list[dict[str, float]], images_seen: int, seconds: float, device: torch.device) -> FitResult:
    """Average the kept checkpoints; keep the average only if it validates at least as well as the best one."""
    states = [torch.load(out_dir / f"epoch{epoch:03d}.pt", map_location=device, weights_only=True) for _, epoch in kept]
    best_metric, best_epoch = kept[0]
    averaged = False
    final = best_metric
    if len(states) > 1:
        model.load_state_dict(average_state_dicts(states))
        model.eval()
        final = float(distributed.from_main(float(task.validate(model))))
        averaged = final >= best_metric
    if not averaged:
        model.load_state_dict(states[0])
        final = best_metric
    model.eval()
    if distributed.world().is_main:
        print(f"{task.name}: best epoch {best_epoch + 1} {task.metric_name} {best_metric:.4f}; top-{len(states)} "
              f"average {'kept' if averaged else 'not better, best epoch kept'} -> {final:.4f}", flush=True)
    return FitResult(best_metric, final, averaged, len(history), images_seen, seconds, history)
