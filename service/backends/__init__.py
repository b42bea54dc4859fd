"""Inference backends: one interface, `run(batch) -> outputs`, several engines (one module each).

`Backend` is what the pipeline calls; it never knows which engine runs underneath. ONNX Runtime on the CPU
is the engine every install has; GPU engines (ONNX Runtime CUDA/TensorRT EPs, PyTorch CUDA FP16) plug in
beside it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs one model on a float32 batch (N, C, S, S) and returns its first output as float32."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...
