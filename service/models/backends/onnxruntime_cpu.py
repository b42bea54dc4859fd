"""ONNX Runtime on the CPU: the backend every install has (no torch, no GPU).

Kept as its own name because training's evaluation asks for the CPU on purpose (figures comparable across
machines); it is `OnnxRuntimeBackend` with the provider list pinned, so it never probes for a GPU nor warns
about an idle one.
"""

from __future__ import annotations

from pathlib import Path

from service.models.backends.onnxruntime import CPU, OnnxRuntimeBackend


class OnnxRuntimeCPU(OnnxRuntimeBackend):
    """One InferenceSession on the CPU provider, created once; thread counts set explicitly."""

    name = "onnxruntime-cpu"

    def __init__(self, model_path: Path, intra_op_threads: int = 0, inter_op_threads: int = 1) -> None:
        super().__init__(model_path, providers=[CPU], intra_op_threads=intra_op_threads,
                         inter_op_threads=inter_op_threads)
