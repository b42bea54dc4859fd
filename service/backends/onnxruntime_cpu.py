"""ONNX Runtime on the CPU: the backend every install has (no torch, no GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxRuntimeCPU:
    """One InferenceSession, created once; thread counts set explicitly (2-core boxes oversubscribe easily)."""

    name = "onnxruntime-cpu"

    def __init__(self, model_path: Path, intra_op_threads: int = 0, inter_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0],
                          dtype=np.float32)
