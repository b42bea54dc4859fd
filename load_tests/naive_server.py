"""A naive triage server, written only as the benchmark's baseline (issue #4 §6). Not for deployment.

    python -m load_tests.naive_server --port 3001 [--classifier DIR --segmenter DIR] [--threads N]

What a first, straightforward server would look like, so that the benchmark measures the serving
architecture and nothing else:

* stdlib `http.server.HTTPServer` (not the threading variant): one request at a time, HTTP/1.0 (the
  connection closes after each answer, so waiting clients queue in the listen backlog instead of one
  keep-alive connection holding the server);
* PyTorch eager, fp32, `torch.inference_mode`, intra-op threads = CPU cores, batch of one film;
* both models on every film (no gating), each with its mirrored pass when hflip TTA is on (as the service);
* the service's own decoding (`read_radiograph`), preprocessing (`to_input`), post-processing
  (`film_result`: triplet threshold at the film's size) and answer (`build_finding`, `Finding.to_json`).

The gate decides only what is *reported* (a mask for films scoring ≥ gate, as the service does), not what
is computed, so both servers answer the same thing for the same file and the benchmark can check it.

`POST /v1/triage[?mask=png|rle|none]` with an `application/dicom` body answers the service's JSON;
errors have the service's shape `{"error": {"code", "message"}}`. `GET /readyz` is 200 once the models
are loaded (the port is bound only then). Settings come from the same `PTX_*` variables as the service
(TTA, priority bands, mm morphology, models), so one environment configures both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from service.cascade.finding import Finding, PriorityBands, build_finding
from service.cascade.masks import MillimetreMorphology
from service.cascade.postprocess import film_result
from service.cascade.preprocess import to_input
from service.cascade.scoring import Scoring
from service.imaging.acceptance import AcceptancePolicy
from service.imaging.radiograph import RadiographError
from service.imaging.reader import read_radiograph
from service.models import manifest as manifests
from service.models.input_spec import InputSpec
from service.models.model_set import resolve
from service.models.thresholds import TripletThreshold
from service.settings import Settings, load_settings
from training.config import from_dict
from training.tasks import build_classifier, build_segmenter

BODY_TYPES = ("application/dicom", "application/octet-stream")
MASK_FORMATS = ("png", "rle", "none")


def load_network(directory: Path, task: str) -> tuple[torch.nn.Module, manifests.Manifest]:
    """The PyTorch network of a model-repository entry, from its manifest's training config and `model.pt`."""
    manifest = manifests.load_manifest(directory)  # verifies the sha256 of model.pt too
    if manifest.task != task:
        raise ValueError(f"{directory} holds a {manifest.task} model, expected {task}")
    if "checkpoint" not in manifest.files:
        raise ValueError(f"{directory}: the manifest lists no PyTorch checkpoint (files: {sorted(manifest.files)})")
    config = from_dict(manifest.training.config)
    network = build_classifier(config.classifier) if task == "classification" else build_segmenter(config.segmenter)
    state = torch.load(directory / manifest.files["checkpoint"], map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval(), manifest


@dataclasses.dataclass
class NaiveTriage:
    """Decode → classifier → segmenter → finding, for one film, in PyTorch eager, nothing skipped."""

    classifier: torch.nn.Module
    classifier_spec: InputSpec
    segmenter: torch.nn.Module
    segmenter_spec: InputSpec
    gate: float
    operating_point: float
    triplet: TripletThreshold
    triplet_reference_size: int
    scoring: Scoring  # the manifest's calibration / fusion at PTX_PREVALENCE, as the service scores (issue 16)
    hflip_tta: bool
    bands: PriorityBands
    morphology: MillimetreMorphology | None
    policy: AcceptancePolicy
    models: dict[str, str]

    @classmethod
    def load(cls, classifier_dir: Path, segmenter_dir: Path, settings: Settings) -> NaiveTriage:
        classifier, cls_manifest = load_network(classifier_dir, "classification")
        segmenter, seg_manifest = load_network(segmenter_dir, "segmentation")
        return cls(
            classifier=classifier,
            classifier_spec=manifests.input_spec(cls_manifest),
            segmenter=segmenter,
            segmenter_spec=manifests.input_spec(seg_manifest),
            gate=cls_manifest.thresholds.gate,
            operating_point=cls_manifest.thresholds.operating_point,
            triplet=manifests.triplet(seg_manifest),
            triplet_reference_size=seg_manifest.thresholds.min_area_reference_size,
            scoring=Scoring(cls_manifest.fusion, settings.prevalence),
            hflip_tta=settings.hflip_tta,
            bands=PriorityBands(settings.stat_score, settings.stat_area_mm2),
            morphology=MillimetreMorphology() if settings.mm_morphology else None,
            policy=AcceptancePolicy(reject_inverted=settings.reject_inverted, max_file_bytes=settings.max_file_bytes),
            models={"classifier": f"{cls_manifest.name} {cls_manifest.version}",
                    "segmenter": f"{seg_manifest.name} {seg_manifest.version}"},
        )

    def _forward(self, network: torch.nn.Module, film: np.ndarray, spec: InputSpec) -> torch.Tensor:
        """Sigmoid output for one film, averaged with the mirrored pass (flipped back) when TTA is on."""
        image = torch.from_numpy(to_input(film, spec)).unsqueeze(0)
        output = torch.sigmoid(network(image))
        if self.hflip_tta:
            mirrored = torch.sigmoid(network(image.flip(-1)))
            output = (output + (mirrored.flip(-1) if output.ndim == 4 else mirrored)) / 2
        return output

    @torch.inference_mode()
    def triage(self, payload: bytes) -> Finding:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        radiograph = read_radiograph(payload, self.policy)
        film = radiograph.pixels
        timings["decode"] = (time.perf_counter() - started) * 1000
        mark = time.perf_counter()
        score = float(self._forward(self.classifier, film, self.classifier_spec).reshape(()))
        timings["classify"] = (time.perf_counter() - mark) * 1000
        mark = time.perf_counter()
        probability = self._forward(self.segmenter, film, self.segmenter_spec)[0, 0].numpy()
        timings["segment"] = (time.perf_counter() - mark) * 1000
        mark = time.perf_counter()
        # Below the gate the map is computed but not reported, as the service (which never computes it) reports
        # nothing.
        result = film_result(*film.shape, score, probability if score >= self.gate else None,
                             self.operating_point, self.triplet, self.triplet_reference_size, self.scoring)
        finding = build_finding(radiograph, result, self.operating_point, self.bands, self.morphology, self.models)
        timings["postprocess"] = (time.perf_counter() - mark) * 1000
        timings["total"] = (time.perf_counter() - started) * 1000
        return dataclasses.replace(finding, timings_ms=timings)


class Handler(BaseHTTPRequestHandler):
    """One request at a time; HTTP/1.0, so every answer closes its connection."""

    server: NaiveServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass  # a line per request on stderr would cost the baseline time the service does not spend

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: str, message: str, status: int) -> None:
        self._answer(status, {"error": {"code": code, "message": message}})

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if urlsplit(self.path).path in ("/readyz", "/livez", "/healthz"):
            self._answer(200, {"status": "ready"})
        else:
            self._error("not_found", f"no route GET {urlsplit(self.path).path}", 404)

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length)
        if url.path != "/v1/triage":
            return self._error("not_found", f"no route POST {url.path}", 404)
        media_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media_type not in BODY_TYPES:
            return self._error("unsupported_media_type",
                               f"Content-Type {media_type or 'absent'!r}; send {', '.join(BODY_TYPES)}", 415)
        mask_format = parse_qs(url.query).get("mask", [self.server.mask_default])[-1]
        if mask_format not in MASK_FORMATS:
            return self._error("invalid_mask_format", f"mask must be one of {', '.join(MASK_FORMATS)}, "
                               f"got {mask_format!r}", 400)
        try:
            finding = self.server.triage.triage(payload)
        except RadiographError as exc:
            return self._error(exc.code.value, exc.message, exc.http_status)
        self._answer(200, finding.to_json(mask_format))


class NaiveServer(HTTPServer):
    request_queue_size = 256  # clients at concurrency C wait in the backlog, never refused (default 5)

    def __init__(self, address: tuple[str, int], triage: NaiveTriage, mask_default: str = "png") -> None:
        self.triage = triage
        self.mask_default = mask_default
        super().__init__(address, Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--classifier", type=Path, help="model folder (default: as the service, from PTX_*)")
    parser.add_argument("--segmenter", type=Path, help="model folder (default: as the service, from PTX_*)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    settings = load_settings()
    torch.set_num_threads(args.threads)
    if args.classifier is None or args.segmenter is None:
        models = resolve(settings)  # the service's own choice of models, from the same settings
        args.classifier = args.classifier or models.classifier.directory
        args.segmenter = args.segmenter or models.segmenter.directory
    triage = NaiveTriage.load(args.classifier, args.segmenter, settings)
    with NaiveServer((args.host, args.port), triage, settings.mask_default) as server:
        print(f"naive server on http://{args.host}:{args.port} ({triage.models}, hflip TTA "
              f"{'on' if triage.hflip_tta else 'off'}, {args.threads} torch threads)", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
