"""Inference backends: one interface, `run(batch) -> outputs`, several engines (one module each).

`Backend` is what the pipeline calls; it never knows which engine runs underneath. ONNX Runtime on the CPU
is the engine every install has; GPU engines (ONNX Runtime CUDA/TensorRT EPs, PyTorch CUDA FP16) plug in
beside it:

* `service.models.backends.onnxruntime`: `OnnxRuntimeBackend`, ONNX Runtime with the best execution provider
  this install has (TensorRT > CUDA > CPU);
* `service.models.backends.onnxruntime_cpu`: `OnnxRuntimeCPU`, the same pinned to the CPU (training's evaluation);
* `service.models.backends.torch_backend`: `TorchBackend`, the network rebuilt from the manifest and its
  checkpoint, CUDA FP16 channels-last (needs torch, which the serving install does not have);
* `service.models.backends.factory`: `load_backend`, which picks one for a model folder and its manifest
  (and, by PTX_PRECISION, which of its files: `service.models.precision`);
* `service.models.backends.hardware_probe`: which GPU and TensorRT this machine has (no onnxruntime needed).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from service.errors import ServiceError


class BackendUnavailable(ServiceError, RuntimeError):
    """The engine asked for cannot run here (a package or the GPU it needs is missing); the message says which."""

    code, http_status = "backend_unavailable", 503


class Backend(Protocol):
    """Runs one model on a float32 batch (N, C, S, S) and returns its first output as float32.

    The output is the model's raw first output: classifier logits (N,), segmenter logits (N, 1, S, S);
    the pipeline applies the sigmoid. `name` says the engine and precision (e.g. "onnxruntime-cuda",
    "torch-cuda-fp16"), for logs and metrics; `provider` the device family that actually runs it
    ("cpu", "cuda" or "tensorrt"), so that a silent fall-back to the CPU is visible.
    """

    name: str
    provider: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class FeatureBackend(Backend, Protocol):
    """A classifier's backend that also returns the pooled encoder features (N, D), the ONNX output `features`
    that the out-of-distribution distance reads (service/models/ood.py); both engines implement it."""

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
