"""PyTorch: the network rebuilt from its manifest and checkpoint; on CUDA in FP16, channels-last.

Why a torch backend beside ONNX Runtime: on a GPU machine where onnxruntime-gpu is missing, or its CUDA and
cuDNN do not match the driver, torch brings its own CUDA and runs the model in FP16 on the tensor cores;
`torch.compile` (optionally with CUDA graphs) cuts per-batch launch overhead further. Channels-last is the
layout cuDNN's FP16 convolutions are fastest in.

Why rebuild from the manifest: the manifest's training config records the architecture (encoder depth,
width, scSE, decoder blocks, auxiliary head) and `model.pt` holds the weights only (a state dict). It is
loaded with `weights_only=True`, so a checkpoint cannot run code, from the very bytes whose sha256 was
checked against the manifest.

The serving install has neither torch nor the `training` package that defines the networks: both are
imported when a `TorchBackend` is created, and their absence is a `BackendUnavailable` that says so.

Outputs match ONNX Runtime's: float32 classifier logits (N,) or segmenter logits (N, 1, S, S), and with
`run_with_features` a classifier's pooled features (N, D) beside its logits.

UNVERIFIED on CUDA: this module has run on the CPU only (FP32, tested against ONNX Runtime); the CUDA FP16,
channels-last, compile and CUDA-graph paths have not run (no GPU was lent while it was written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from service.models.backends import BackendUnavailable
from service.models.manifest import Manifest, ManifestError, read_members

Device = Literal["auto", "cpu", "cuda"]
_SECTIONS = {"classification": "classifier", "segmentation": "segmenter"}
_BUCKET_STEP = 32


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as error:
        raise BackendUnavailable(
            "PyTorch is not installed: the torch backend needs it (pip install -c constraints.txt -e '.[train]'); "
            "the onnxruntime backend does not"
        ) from error
    return torch


@dataclass(frozen=True)
class NetworkSpec:
    """The architecture of a model, from its manifest (the fields of training's NetworkConfig it needs)."""

    task: str
    encoder_depth: int
    width: int
    in_channels: int
    scse: bool = False
    aux_segmentation: bool = False
    decoder_blocks: int = 5
    encoder: str = "resnet"  # or "seresnext" (service/models/networks/encoder.py)
    members: int = 0  # an ensemble of this many such networks (training/cv.py), 0: a single network


def network_spec(manifest: Manifest) -> NetworkSpec:
    """Read `training.config.<classifier|segmenter>.network` of the manifest into a NetworkSpec."""
    section = _SECTIONS[manifest.task]
    try:
        return spec_from_config(manifest.task, manifest.training.config[section]["network"], manifest.input.channels)
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(
            f"{manifest.name} {manifest.version}: training.config.{section}.network cannot describe the network "
            f"({type(error).__name__}: {error}); the torch backend needs encoder_depth and width there"
        ) from error


def spec_from_config(task: str, network: Mapping[str, Any], in_channels: int) -> NetworkSpec:
    """A NetworkSpec from a training config's `network` mapping; absent optional keys take training's defaults."""
    if task not in _SECTIONS:
        raise ValueError(f"task must be one of {sorted(_SECTIONS)}, got {task!r}")
    return NetworkSpec(
        task=task,
        encoder_depth=int(network["encoder_depth"]),
        width=int(network["width"]),
        in_channels=int(in_channels),
        scse=bool(network.get("scse", False)),
        aux_segmentation=bool(network.get("aux_segmentation", False)),
        decoder_blocks=int(network.get("decoder_blocks", 5)),
        encoder=str(network.get("encoder", "resnet")),
    )


def build_network(spec: NetworkSpec) -> Any:
    """A randomly initialised `Classifier` or `UNet` (from service.models.networks) for `spec`; with
    `spec.members`, an ensemble of them averaging probabilities (service/models/networks/ensemble.py)."""
    import_torch()
    try:
        from service.models.networks import Classifier, UNet
        from service.models.networks.ensemble import ClassifierEnsemble, UNetEnsemble
    except ImportError as error:
        raise BackendUnavailable(
            "the torch backend needs the `training` package (training/networks) beside `service`; "
            "the serving bundle ships service/ only: use the onnxruntime backend there"
        ) from error

    def one() -> Any:
        if spec.task == "classification":
            return Classifier(encoder_depth=spec.encoder_depth, in_channels=spec.in_channels, width=spec.width,
                              aux_segmentation=spec.aux_segmentation, encoder_kind=spec.encoder)
        return UNet(encoder_depth=spec.encoder_depth, in_channels=spec.in_channels, width=spec.width,
                    scse=spec.scse, decoder_blocks=spec.decoder_blocks, encoder_kind=spec.encoder)

    if spec.members:
        ensemble = ClassifierEnsemble if spec.task == "classification" else UNetEnsemble
        return ensemble([one() for _ in range(spec.members)])
    return one()


def load_network(model_dir: Path, manifest: Manifest) -> Any:
    """The network of `manifest` with the weights of its checkpoint (sha256 checked), in eval mode on the CPU."""
    torch = import_torch()
    filename = manifest.files.get("checkpoint")
    if filename is None:
        raise ManifestError(
            f"{manifest.name} {manifest.version} lists no 'checkpoint' file (model.pt) among {sorted(manifest.files)}: "
            "the torch backend needs the weights; use the onnxruntime backend"
        )
    path = Path(model_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint listed in the manifest of {manifest.name} is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256[filename]:
        raise ManifestError(f"{path}: sha256 is {digest[:12]}…, manifest says {manifest.sha256[filename][:12]}…: "
                            "refusing a checkpoint that differs from its manifest")
    members = len(read_members(Path(model_dir), manifest))
    network = build_network(dataclasses.replace(network_spec(manifest), members=members))
    network.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))  # strict
    for part in getattr(network, "members", [network]):
        if getattr(part, "aux_head", None) is not None:
            part.aux_head = None  # trained with it, never used at inference: free its memory
    return network.eval()


def batch_bucket(size: int) -> int:
    """The padded batch size under torch.compile: powers of two to 32, then multiples of 32.

    Why: a compiled graph (and a CUDA graph) is specialised to one shape, and dynamo stops compiling after a
    few shapes; adaptive batching sends every size from 1 to its maximum, so sizes are rounded up to a few.
    """
    if size <= 1:
        return size
    if size <= _BUCKET_STEP:
        return 1 << (size - 1).bit_length()
    return -(-size // _BUCKET_STEP) * _BUCKET_STEP


class TorchBackend:
    """One network on one device, prepared once (eval, precision, layout, compile); `run` in inference mode.

    Args:
        model_dir, manifest: the model folder and its (verified) manifest.
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        fp16: half precision; default on CUDA, and refused on the CPU (slow there, and not what ONNX gives).
        channels_last: NHWC memory layout; default on CUDA.
        compile: `torch.compile` the network (batches are padded to a few sizes, see `batch_bucket`).
        cuda_graphs: compile in "reduce-overhead" mode (CUDA graphs); needs `compile` and CUDA.
        threads: torch's CPU threads (process-wide!); 0 leaves torch's default.
    """

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        *,
        device: Device = "auto",
        fp16: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        threads: int = 0,
    ) -> None:
        network = load_network(Path(model_dir), manifest)
        size = manifest.input.size
        self._prepare(network, (manifest.input.channels, size, size), device=device, fp16=fp16,
                      channels_last=channels_last, compile=compile, cuda_graphs=cuda_graphs, threads=threads)

    @classmethod
    def from_network(cls, network: Any, *, device: Device = "auto", fp16: bool | None = None,
                     channels_last: bool | None = None, compile: bool = False, cuda_graphs: bool = False,
                     threads: int = 0) -> TorchBackend:
        """A backend around an already built network (benchmarks: other input sizes, random weights).

        The network is converted in place (device, precision, layout): pass one nothing else uses.
        """
        backend = cls.__new__(cls)
        backend._prepare(network, None, device=device, fp16=fp16, channels_last=channels_last, compile=compile,
                         cuda_graphs=cuda_graphs, threads=threads)
        return backend

    def _prepare(self, network: Any, input_shape: tuple[int, int, int] | None, *, device: Device,
                 fp16: bool | None, channels_last: bool | None, compile: bool, cuda_graphs: bool,
                 threads: int) -> None:
        torch = self._torch = import_torch()
        self.device = resolve_device(torch, device)
        on_cuda = self.device == "cuda"
        self.fp16 = on_cuda if fp16 is None else bool(fp16)
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        if self.fp16 and not on_cuda:
            raise ValueError("fp16 needs device 'cuda': FP16 convolutions on the CPU are slow; use fp16=False")
        if cuda_graphs and not (compile and on_cuda):
            raise ValueError("cuda_graphs needs compile=True and device 'cuda' (torch.compile's reduce-overhead mode)")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {threads}")
        if threads:
            torch.set_num_threads(threads)
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        network = network.eval().to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.compiled = bool(compile)
        # A classifier's logits with its pooled features (the OOD distance's input), compiled like `forward`.
        self.with_features = getattr(network, "forward_with_features", None)
        if compile:
            mode = "reduce-overhead" if cuda_graphs else "default"
            if self.with_features is not None:
                self.with_features = torch.compile(self.with_features, mode=mode, dynamic=False)
            network = torch.compile(network, mode=mode, dynamic=False)
        self.network = network
        self.input_shape = input_shape
        self.provider = self.device
        self.name = f"torch-{self.device}" + ("-fp16" if self.fp16 else "")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, features=False)[0]

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A classifier's logits and pooled encoder features (float32), as the ONNX file's two outputs."""
        if self.with_features is None:
            raise ValueError("this network has no pooled features: only a classifier has")
        logits, features = self._run(batch, features=True)
        return logits, features

    def _run(self, batch: np.ndarray, features: bool) -> list[np.ndarray]:
        torch = self._torch
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or (self.input_shape is not None and batch.shape[1:] != self.input_shape):
            raise ValueError(f"batch must be (N, {', '.join(map(str, self.input_shape or ('C', 'S', 'S')))}) "
                             f"float32, got shape {batch.shape}")
        count = len(batch)
        padded = batch_bucket(count) if self.compiled else count
        if padded != count:
            batch = np.concatenate([batch, np.zeros((padded - count, *batch.shape[1:]), np.float32)])
        with torch.inference_mode():
            images = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
            outputs = self.with_features(images) if features else (self.network(images),)
            return [np.ascontiguousarray(output[:count].float().cpu().numpy(), dtype=np.float32) for output in outputs]


def resolve_device(torch: ModuleType, device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device 'cuda' asked for, but torch {torch.__version__} sees no CUDA device "
                                 "(a CPU-only torch build, or no GPU or driver)")
    return device
