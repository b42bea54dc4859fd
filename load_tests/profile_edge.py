"""Per-film CPU of the edge, stage by stage: what the service spends on a film outside the models (issue 15 §3).

    python -m load_tests.profile_edge [--films DIR] [--count 24] [--repeat 5] [--reduced | --full]

Each film's bytes go through the edge's own functions in this process, stage by stage in the flow's order,
each timed in CPU time of this thread; `--repeat` rounds take every film once in turn (so its data is as cold
as a request's), and a stage's figure is the mean over films of its least time over the rounds (on a shared
box: the CPU a stage costs, without the waits for a core that others' work adds). Stages: body handling (the
ASGI body read in 64 KiB chunks, as uvicorn hands it), parse (header and checks), decode (stored values), grey scale (to
display values), the whole `read_film` (parse + decode + grey scale + checks), resize (model inputs),
mask upsampling (`film_result`), instances + RLE (`build_finding`), PNG (the answer's mask) and JSON (the
answer rendered as Starlette does). The models run once per film, untimed, to give each film its real
score and map, so films with a mask and without one are reported apart. The default films are 1024²
uncompressed synthetic DICOMs (the benchmark's), made once under data/bench/; `--films` takes any folder
of DICOMs (the real JPEG 2000 film, say). `--reduced` decodes at the models' resolution (PTX_REDUCED_DECODE),
`--full` at full size. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STAGES = ("body", "parse", "decode", "grey scale", "read_film", "resize", "mask upsampling", "instances + RLE",
          "PNG", "JSON")
EDGE = ("body", "read_film", "resize", "mask upsampling", "instances + RLE", "PNG", "JSON")  # their sum


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """Thread CPU milliseconds of one call, and its result."""
    started = time.thread_time()
    result = function()
    return (time.thread_time() - started) * 1e3, result


def body_ms(payload: bytes) -> float:
    """Thread CPU ms of the HTTP edge's body read (`service.http.bodies.read_body`) over an ASGI stream of 64 KiB
    chunks, as uvicorn hands them over."""
    from starlette.requests import Request

    from service.http.bodies import read_body

    scope = {"type": "http", "method": "POST", "path": "/v1/triage", "headers": [
        (b"content-type", b"application/dicom"), (b"content-length", str(len(payload)).encode())]}
    chunks = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def once() -> float:
        started = time.thread_time()
        body = await read_body(Request(scope, receive), 1 << 30)
        elapsed = (time.thread_time() - started) * 1e3
        if body != payload:
            raise AssertionError("the body read differs from what was sent")
        return elapsed

    return asyncio.run(once())


def profile(paths: list[Path], repeat: int, reduced: bool) -> dict[str, dict[str, float]]:
    """Mean over films of each stage's least CPU ms over `repeat` rounds, for films with a mask and without one.

    Each round takes every film once, in turn, so a film's bytes and arrays are as cold in the caches as a
    request's are (timing one film again and again would find them warm, and halve the parse and decode).
    """
    from service.imaging.acceptance import AcceptancePolicy
    from service.models.manifest import find_models
    from training.evaluate import load_cascade

    models = {manifest.task: path for path, manifest in find_models(REPO / "models")}
    cascade, _ = load_cascade(models["classification"], models["segmentation"], threads=1)
    policy = AcceptancePolicy()
    side = max(cascade.classifier_spec.size, cascade.segmenter_spec.size)
    film_policy = with_reduction(policy, side if reduced else None)
    payloads = [path.read_bytes() for path in paths]
    outputs: dict[int, tuple[float, Any]] = {}  # the models' answer per film, computed once (not timed)
    least: list[dict[str, float]] = [{} for _ in payloads]
    masked = [False] * len(payloads)
    for _ in range(repeat):
        for index, payload in enumerate(payloads):
            ms, masked[index] = film_stages(payload, cascade, policy, film_policy, outputs, index)
            least[index] = {stage: min(value, least[index].get(stage, value)) for stage, value in ms.items()}
    rows: dict[str, list[dict[str, float]]] = {"with mask": [], "without mask": []}
    for ms, has_mask in zip(least, masked):
        rows["with mask" if has_mask else "without mask"].append(ms)
    return {kind: {stage: float(np.mean([r[stage] for r in found])) for stage in STAGES} | {"films": len(found)}
            for kind, found in rows.items() if found}


def film_stages(payload: bytes, cascade: Any, policy: Any, film_policy: Any, outputs: dict[int, tuple[float, Any]],
                index: int) -> tuple[dict[str, float], bool]:
    """One film's stage timings (CPU ms, each stage once, in the flow's order) and whether it has a mask. The
    parse / decode / grey scale breakdown is timed last, on bytes `read_film` has just read."""
    from starlette.responses import JSONResponse

    from service.cascade.finding import PriorityBands, build_finding, mask_png
    from service.cascade.postprocess import film_result
    from service.cascade.preprocess import to_batch
    from service.imaging.decoding import decode_pixels
    from service.imaging.display import to_display
    from service.imaging.header import check_header
    from service.imaging.reader import parse_dicom, read_film
    from service.models.inference import classify_scores, segment_maps

    ms: dict[str, float] = {"body": body_ms(payload)}
    ms["read_film"], film = timed(lambda: read_film(payload, film_policy))
    radiograph = film.radiograph
    # The flow hands the radiograph itself since issue 15 (its pixels may be reduced); before, the pixels.
    source = radiograph if hasattr(radiograph, "grid") else radiograph.pixels
    ms["resize"], batch = timed(lambda: to_batch([source], cascade.classifier_spec))
    if index not in outputs:
        score = float(classify_scores(cascade.classifier, batch, cascade.hflip_tta)[0])
        probability = None
        if score >= cascade.gate:
            probability = segment_maps(cascade.segmenter, to_batch([source], cascade.segmenter_spec),
                                       cascade.hflip_tta)[0]
        outputs[index] = (score, probability)
    score, probability = outputs[index]
    ms["mask upsampling"], result = timed(lambda: film_result(
        radiograph.rows, radiograph.columns, score, probability, cascade.operating_point, cascade.triplet,
        cascade.triplet_reference_size))
    ms["instances + RLE"], finding = timed(lambda: build_finding(
        radiograph, result, cascade.operating_point, PriorityBands()))
    ms["PNG"], png = timed(lambda: mask_png(finding.mask))
    ms["JSON"], _ = timed(lambda: JSONResponse(finding.to_json("rle") | {"mask_png": png}).body)
    ms["parse"], (ds, _) = timed(lambda: parse_dicom(payload))
    header = check_header(ds, policy)
    ms["decode"], decoded = timed(lambda: decode_pixels(ds))
    stored = getattr(decoded, "stored", decoded)  # a `Decoded` since issue 15, an array before
    ms["grey scale"], _ = timed(lambda: to_display(stored, ds, header))
    return ms, bool(finding.mask.any())


def with_reduction(policy: Any, side: int | None) -> Any:
    """The policy decoding at `side` where this code has reduced decoding (None: full size)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(policy)}
    return dataclasses.replace(policy, decode_min_side=side) if "decode_min_side" in fields else policy


def default_films(count: int) -> list[Path]:
    from load_tests.bench_service import synthetic_films

    return synthetic_films(count, 0, REPO / "data" / "bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=Path, default=None, help="folder of DICOMs (default: synthetic 1024²)")
    parser.add_argument("--count", type=int, default=24, help="synthetic films, when --films is not given")
    parser.add_argument("--repeat", type=int, default=5, help="rounds over the films (each stage's least is kept)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reduced", dest="reduced", action="store_true", default=True)
    mode.add_argument("--full", dest="reduced", action="store_false")
    args = parser.parse_args(argv)
    paths = sorted(args.films.glob("*.dcm")) if args.films else default_films(args.count)
    if not paths:
        raise SystemExit(f"no .dcm files in {args.films}")
    report = profile(paths, args.repeat, args.reduced)
    kinds = list(report)
    heads = [f"{kind} ({int(report[kind]['films'])})" for kind in kinds]
    print(f"| stage (ms per film) | {' | '.join(heads)} |")
    print("|---|" + "---:|" * len(kinds))
    for stage in STAGES:
        print(f"| {stage} | {' | '.join(f'{report[k][stage]:.2f}' for k in kinds)} |")
    print(f"| **edge CPU** ({' + '.join(EDGE)}) | "
          f"{' | '.join(f'**{sum(report[k][s] for s in EDGE):.2f}**' for k in kinds)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
