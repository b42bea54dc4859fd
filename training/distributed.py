"""Training on several processes (`torchrun --nproc_per_node N`): one global batch split over the processes.

Why it is shaped this way:
* `optim.batch_size` stays the *global* batch: each of N processes takes its share of every batch the
  one-process run would take (the same films, in the same order), and DistributedDataParallel averages the
  gradients. A config therefore trains the same steps on 1 GPU or on 8, and the test compares exactly that.
* The loss is computed inside the wrapped module (`LossOf`), so every model call goes through DDP's forward
  whatever the task calls (`forward_with_mask` included), and the wrapper is rebuilt each epoch because
  DDP registers only the parameters that need a gradient when it is built (the encoder is frozen in warm-up).
* Decisions that must agree on every process (early stopping, the wall-clock budget, whether the averaged
  weights are kept) are taken by process 0 and broadcast: validation metrics computed on each process may
  differ in the last bits, and a clock always does. Only process 0 writes files.
* BatchNorm statistics are per process (each computes them on its share of the batch), DDP's default; on
  CUDA they are synchronised (`SyncBatchNorm`) so that the steps match the one-process run. PyTorch has no
  CPU SyncBatchNorm, so on CPU (gloo) a network with BatchNorm trains close to, not exactly like, one process.
Without torchrun's environment (`WORLD_SIZE` unset or 1) everything here is a no-op: one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """One GPU per process (the local rank's), else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def world() -> World:
    """The world torchrun describes in the environment, its process group started on first use
    (NCCL on GPUs, gloo on CPUs); one process without torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    current = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(current.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return current


def close() -> None:
    """End the process group (at the end of a torchrun command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first, the others after it (e.g. building a data cache they then reuse)."""
    current = world()
    if not current.is_main:
        barrier()
    yield
    if current.is_main:
        barrier()


def from_main(value: float | bool) -> float | bool:
    """Process 0's value on every process."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the processes (a batch's loss: each process holds its share's)."""
    if not dist.is_initialized():
        return float(value)
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def global_batches(count: int, batch_size: int, size: int) -> list[np.ndarray]:
    """The positions 0..count-1 cut into the batches one process would take: in order, the last one dropped
    when partial unless it is the only one. With several processes a batch must give each one film at least."""
    if batch_size < size:
        raise ValueError(f"optim.batch_size {batch_size} is the global batch and must be at least the number "
                         f"of training processes (WORLD_SIZE {size})")
    batches = [np.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return [batch for batch in batches if len(batch) >= size]


def shard(batch: np.ndarray, current: World) -> list[int]:
    """This process's share of a global batch (contiguous; sizes differ by one at most)."""
    return [int(i) for i in np.array_split(batch, current.size)[current.rank]]


class LossOf(nn.Module):
    """A model and its task's loss as one module: DDP wraps this, so the loss's model calls all go through
    DDP's forward, whichever method of the model the task uses."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, images, masks, targets)


def prepare(model: nn.Module, current: World) -> nn.Module:
    """On several CUDA processes, BatchNorm synchronised over them (in place, same state-dict keys)."""
    if current.size > 1 and current.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model: nn.Module, loss: Callable[..., torch.Tensor], current: World) -> nn.Module:
    """The module a training step calls: the loss of `model`, under DDP with several processes. Built
    after the epoch's freezing, since DDP takes only the parameters that need a gradient at construction."""
    step = LossOf(model, loss)
    if current.size <= 1:
        return step
    device_ids = [current.local_rank] if current.device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids)


def accumulating(step: nn.Module, syncing: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce on a micro-batch that does not end an accumulation (DDP's `no_sync`)."""
    if syncing or not isinstance(step, DistributedDataParallel):
        return contextlib.nullcontext()
    return step.no_sync()
