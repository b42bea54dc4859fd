"""GPU benchmark: the PyTorch backend on CUDA in FP16 (channels-last), models only, at 512² input.

    python load_tests/bench_gpu.py [--size 512] [--batches 1 8 32] [--iterations 50] [--warmup 10]
                                   [--compile [--cuda-graphs]] [--append]

Networks: (a) the bundled demo classifier and segmenter with their checkpoints, rebuilt at --size (they are
fully convolutional; trained at 512² and 256², so the figures are speed only); (b) production-sized networks with
random weights, as `training/configs/siim-gpu.yaml` defines them (ResNet-34, width 64; the segmenter with
scSE and the full decoder). "Models only": no decoding, resizing or post-processing.

Per network and batch: `TorchBackend.run` latency (numpy in, numpy out: host-to-device and back included,
which is what the service pays), median and 95th percentile, images/s from the median, and the GPU-only
median (input already on the GPU, output left there). After warm-up calls (which include any compilation),
each timed call ends in torch.cuda.synchronize. A last line per network compares FP16 with FP32 sigmoid
outputs of the same weights on the same GPU, so a first run also checks the FP16 path.

Without a CUDA device (or torch), exits with status 2. `--append` adds the table, with this command, to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.models.backends.torch_backend import (  # noqa: E402
    TorchBackend,
    build_network,
    load_network,
    spec_from_config,
)
from service.models.manifest import load_manifest  # noqa: E402

DEMO_MODELS = {
    "demo classifier (R18 w16, aux head dropped)": ROOT / "models" / "ptx-classifier-demo" / "0.2.0",
    "demo segmenter (R18 w16 U-Net, decoder to 1/4)": ROOT / "models" / "ptx-segmenter-demo" / "0.2.0",
}
PRODUCTION_CONFIG = ROOT / "training" / "configs" / "siim-gpu.yaml"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
NO_CUDA = 2


def production_networks() -> dict[str, Callable[[], Any]]:
    """Random-init builders for the siim-gpu networks, read from the config so the two never disagree."""
    import yaml

    config = yaml.safe_load(PRODUCTION_CONFIG.read_text(encoding="utf-8"))
    builders = {}
    for section, task in (("classifier", "classification"), ("segmenter", "segmentation")):
        spec = spec_from_config(task, config[section]["network"], config[section]["input"]["channels"])
        parts = [f"R{spec.encoder_depth} w{spec.width}"] + (["scSE"] if spec.scse else [])
        parts += [f"{spec.decoder_blocks} decoder blocks"] if task == "segmentation" else []
        label = f"siim-gpu {section} ({', '.join(parts)}, random weights)"
        builders[label] = lambda spec=spec: _without_aux_head(build_network(spec))
    return builders


def _without_aux_head(network: Any) -> Any:
    if getattr(network, "aux_head", None) is not None:
        network.aux_head = None  # as the backend does for checkpoints: never used at inference
    return network.eval()


def demo_networks() -> dict[str, Callable[[], Any]]:
    return {label: lambda d=directory: load_network(d, load_manifest(d)) for label, directory in DEMO_MODELS.items()}


def time_calls(call: Callable[[], object], sync: Callable[[], None], warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return times


def bench_network(label: str, build: Callable[[], Any], args: argparse.Namespace, torch: Any) -> tuple[list[str], str]:
    network = build()
    fp32_copy = copy.deepcopy(network)  # the same weights (random ones included) for the FP16 check
    backend = TorchBackend.from_network(network, device="cuda", compile=args.compile, cuda_graphs=args.cuda_graphs)
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in args.batches:
        batch = rng.normal(size=(batch_size, 1, args.size, args.size)).astype(np.float32)
        on_gpu = torch.from_numpy(batch).to(backend.device, dtype=backend.dtype, memory_format=backend.memory_format)

        def gpu_only() -> None:
            with torch.inference_mode():
                backend.network(on_gpu)

        run = time_calls(lambda: backend.run(batch), torch.cuda.synchronize, args.warmup, args.iterations)
        gpu = time_calls(gpu_only, torch.cuda.synchronize, args.warmup, args.iterations)
        p50, p95 = statistics.median(run), float(np.percentile(run, 95))
        rows.append(f"| {label} | {batch_size} | {p50 * 1e3:.2f} | {p95 * 1e3:.2f} | {batch_size / p50:,.0f} "
                    f"| {statistics.median(gpu) * 1e3:.2f} |")
    sample = rng.normal(size=(8, 1, args.size, args.size)).astype(np.float32)
    reference = TorchBackend.from_network(fp32_copy, device="cuda", fp16=False, channels_last=False)
    sigmoid = lambda logits: 1 / (1 + np.exp(-np.clip(logits, -60, 60)))  # noqa: E731
    difference = np.abs(sigmoid(backend.run(sample)) - sigmoid(reference.run(sample))).max()
    note = f"{label}: FP16 vs FP32 on this GPU, batch 8: max |Δ probability| = {difference:.2e}"
    backend = reference = None  # free GPU memory before the next network (the closure above holds `backend`)
    torch.cuda.empty_cache()
    return rows, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (a multiple of 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile: reduce-overhead mode")
    parser.add_argument("--append", action="store_true", help=f"append the results to {BENCHMARKS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.size < 32 or args.size % 32:
        parser.error(f"--size must be a multiple of 32, got {args.size}")
    if args.cuda_graphs and not args.compile:
        parser.error("--cuda-graphs needs --compile (it is torch.compile's reduce-overhead mode)")
    try:
        import torch
    except ImportError:
        print("bench_gpu needs torch with CUDA; torch is not installed", file=sys.stderr)
        return NO_CUDA
    if not torch.cuda.is_available():
        print(f"bench_gpu needs a CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
              "sees none. Run it on a GPU machine with a CUDA build of torch.", file=sys.stderr)
        return NO_CUDA
    torch.backends.cudnn.benchmark = True  # fixed shapes per batch size: let cuDNN pick its fastest kernels

    gpu = torch.cuda.get_device_name(0)
    mode = "compiled" + (" + CUDA graphs" if args.cuda_graphs else "") if args.compile else "eager"
    header = (f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
              f"FP16 channels-last, {mode}; {args.size}² input; {args.warmup} warm-up + {args.iterations} timed calls")
    lines = ["| network | batch | run() p50 ms | run() p95 ms | images/s | GPU-only p50 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    notes = []
    for label, build in {**demo_networks(), **production_networks()}.items():
        rows, note = bench_network(label, build, args, torch)
        lines += rows
        notes.append(note)
        print("\n".join(rows), flush=True)
    table = "\n".join(lines)
    print(f"\n{header}\n\n{table}\n\n" + "\n".join(notes))
    if args.append:
        command = "python load_tests/bench_gpu.py " + " ".join(sys.argv[1:])
        section = (f"\n### {datetime.date.today().isoformat()}, {gpu}\n\n`{command.strip()}`: {header}.\n\n{table}\n\n"
                   + "\n".join(f"- {note}" for note in notes) + "\n")
        with BENCHMARKS.open("a", encoding="utf-8") as stream:
            stream.write(section)
        print(f"appended to {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
