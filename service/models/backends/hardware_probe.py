"""What GPU and TensorRT this machine has, probed without needing either (for the provider plan and the logs).

Apart from the ONNX Runtime backend because none of it touches onnxruntime: the model worker probes for a
visible GPU at start (the `gpu_visible` metric) and the plan keys TensorRT's engine cache by GPU name and
TensorRT version. Each probe returns None where the thing is absent; none of them raises.

UNVERIFIED: no GPU nor TensorRT was available where this was written (see `backends/onnxruntime.py`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

TRT_LIBRARIES = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so")
UNKNOWN_GPU = "unknown NVIDIA GPU"


def probe_gpu() -> str | None:
    """The name of a visible NVIDIA GPU, or None. Tries nvidia-smi, then torch (if installed), then /dev/nvidia0."""
    name = _nvidia_smi_gpu_name() or _torch_gpu_name()
    if name is None and Path("/dev/nvidia0").exists():
        return UNKNOWN_GPU
    return name


def _nvidia_smi_gpu_name() -> str | None:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        result = subprocess.run([executable, "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return names[0] if result.returncode == 0 and names else None


def _torch_gpu_name() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch
    except (ImportError, OSError):  # OSError: a torch wheel whose CUDA libraries are broken
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def probe_tensorrt_version() -> str | None:
    """TensorRT's version from the `tensorrt` package or from libnvinfer itself; None if neither loads.

    UNVERIFIED (no TensorRT here): the libnvinfer fall-back reads `getInferLibVersion()`.
    """
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except (ImportError, OSError):
        pass
    for library in TRT_LIBRARIES:
        try:
            function = ctypes.CDLL(library).getInferLibVersion
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_int32
        return decode_tensorrt_version(int(function()))
    return None


def decode_tensorrt_version(code: int) -> str:
    """`getInferLibVersion()` -> "major.minor.patch": major*10000 + ... from TensorRT 10 on, major*1000 + ... before."""
    if code <= 0:
        raise ValueError(f"TensorRT version code must be positive, got {code}")
    major, rest = divmod(code, 10000 if code >= 100000 else 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"
