"""The benchmark's tools: the naive baseline server answers what the cascade answers, and the numbers
the benchmark reports (latency summary, model-only limit, agreement) are computed as documented."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from load_tests.bench_service import (
    PLACEHOLDER,
    SECTION,
    agreement,
    append_to_section,
    gated_fraction,
    model_only_limit,
    post_all,
    summarise,
)
from service.cascade import rle
from service.cascade.finding import PriorityBands, build_finding
from service.imaging.reader import read_radiograph
from service.models.model_set import resolve
from service.settings import load_settings
from tests.servers import REPO, free_port, wait_http
from training.__main__ import main as training_main
from training.evaluate import load_cascade


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("bench-films")
    assert training_main(["synth", "--out", str(out), "--count", "6", "--seed", "2", "--prevalence", "0.5",
                          "--uncompressed", "--workers", "1", "--quiet"]) == 0
    return sorted((out / "dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def models():
    return resolve(load_settings(environ={}))  # the embedded defaults: the bundled demo models


@pytest.fixture(scope="module")
def naive_base(models, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The naive server for real, in a subprocess on a loopback port, stopped by its PID."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("naive-server") / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PTX_")}  # defaults: TTA on
    process = subprocess.Popen(
        [sys.executable, "-m", "load_tests.naive_server", "--port", str(port), "--threads", "2",
         "--classifier", str(models.classifier.directory), "--segmenter", str(models.segmenter.directory)],
        cwd=REPO, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(f"{base}/readyz", 60, process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; server log:\n{log_path.read_text(errors='replace')}") from exc
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_naive_server_answers_what_the_cascade_answers(naive_base: str, films: list[Path], models) -> None:
    cascade, info = load_cascade(models.classifier.directory, models.segmenter.directory, hflip_tta=True, threads=2)
    records, wall = asyncio.run(post_all(naive_base, [(p.name, p.read_bytes()) for p in films], 2, "rle"))
    assert wall > 0 and len(records) == len(films)
    assert all(r.status == 200 for r in records), [r.problem for r in records]
    # post_all keeps the answer without its mask; ask once more per film for the RLE to compare masks.
    import httpx

    labels, masked = set(), 0
    for path in films:
        radiograph = read_radiograph(path)
        result = cascade.run([radiograph.pixels])[0]
        expected = build_finding(radiograph, result, cascade.operating_point, PriorityBands(), models=info)
        answer = httpx.post(f"{naive_base}/v1/triage?mask=rle", content=path.read_bytes(),
                            headers={"Content-Type": "application/dicom"}, timeout=60).json()
        record = next(r for r in records if r.name == path.name)
        assert record.body["score"] == answer["score"]  # the same film gives the same answer twice
        assert answer["score"] == pytest.approx(expected.score, abs=1e-4)
        assert answer["label"] == ("pneumothorax" if expected.positive else "no_pneumothorax")
        assert answer["priority"] == expected.priority.value
        assert answer["models"] == info
        assert answer["sop_uid"] == radiograph.sop_uid
        assert set(answer["timings_ms"]) >= {"decode", "classify", "segment", "total"}  # segmenter on every film
        mask = rle.decode(answer["rle"], *radiograph.pixels.shape)
        union = np.logical_or(mask, expected.mask).sum()
        assert union == 0 or np.logical_and(mask, expected.mask).sum() / union > 0.99
        labels.add(answer["label"])
        masked += bool(mask.any())
    # Seed 2 holds a film under the gate (segmented but not reported) and positives with masks.
    assert labels == {"pneumothorax", "no_pneumothorax"} and masked >= 1


def test_naive_server_refuses_like_the_service(naive_base: str) -> None:
    import httpx

    answer = httpx.post(f"{naive_base}/v1/triage", content=b"not a dicom" * 100,
                        headers={"Content-Type": "application/dicom"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "not_dicom"
    answer = httpx.post(f"{naive_base}/v1/triage", content=b"{}", headers={"Content-Type": "application/json"})
    assert answer.status_code == 415 and answer.json()["error"]["code"] == "unsupported_media_type"
    answer = httpx.post(f"{naive_base}/v1/triage?mask=jpeg", content=b"x",
                        headers={"Content-Type": "application/dicom"})
    assert answer.status_code == 400 and set(answer.json()["error"]) == {"code", "message"}


def test_summary_of_known_latencies() -> None:
    latencies = [ms / 1000 for ms in range(1, 101)]  # 1 .. 100 ms
    summary = summarise(list(reversed(latencies)), errors=2, wall_s=4.0)
    assert (summary.requests, summary.ok, summary.errors) == (102, 100, 2)
    assert summary.throughput == pytest.approx(25.0)  # successes only
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.mean_ms == pytest.approx(50.5)
    constant = summarise([0.2] * 7, errors=0, wall_s=1.4)
    assert (constant.p50_ms, constant.p99_ms, constant.throughput) == (pytest.approx(200), pytest.approx(200),
                                                                       pytest.approx(5.0))
    empty = summarise([], errors=3, wall_s=1.0)
    assert empty.ok == 0 and empty.throughput == 0 and math.isnan(empty.p50_ms)
    with pytest.raises(ValueError, match="wall_s must be positive"):
        summarise([0.1], errors=0, wall_s=0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        summarise([-0.1], errors=0, wall_s=1)


def test_model_only_limit_formula() -> None:
    assert model_only_limit(0.003, 0.006, 0.22) == pytest.approx(1 / (0.003 + 0.22 * 0.006))  # 231.5 films/s
    assert model_only_limit(0.003, 0.006, 0.0) == pytest.approx(1 / 0.003)
    assert model_only_limit(0.003, 0.006, 1.0) == pytest.approx(1 / 0.009)
    assert model_only_limit(0.003, 0.006, 0.5) < model_only_limit(0.003, 0.006, 0.22)
    with pytest.raises(ValueError, match="gated_fraction"):
        model_only_limit(0.003, 0.006, 1.5)
    with pytest.raises(ValueError, match="t_classify > 0"):
        model_only_limit(0.0, 0.006, 0.22)


def test_agreement_and_gated_fraction() -> None:
    models = {"classifier": "c 1", "segmenter": "s 1"}
    base = {"a": {"score": 0.10, "label": "no_pneumothorax", "models": models},
            "b": {"score": 0.90, "label": "pneumothorax", "models": models}}
    other = {"a": {"score": 0.1000004, "label": "no_pneumothorax", "models": models, "timings_ms": {"classify": 1}},
             "b": {"score": 0.89, "label": "no_pneumothorax", "models": models, "timings_ms": {"segment": 2}},
             "c": {"score": 0.5, "label": "pneumothorax", "models": models, "timings_ms": {"segment": 2}}}
    result = agreement(base, other)
    assert result.compared == 2 and result.max_abs_score_difference == pytest.approx(0.01)
    assert result.label_mismatches == ["b"] and result.models_equal
    assert not agreement(base, {"a": {**other["a"], "models": {"classifier": "c 2", "segmenter": "s 1"}}}).models_equal
    described = {"classifier": {"name": "c", "version": "1", "backend": "onnxruntime-cpu"},
                 "segmenter": {"name": "s", "version": "1", "backend": "onnxruntime-cpu"}}
    assert agreement(base, {"a": {**other["a"], "models": described}}).models_equal
    fractions = gated_fraction(other, gate=0.2)
    assert fractions["from_timings"] == pytest.approx(2 / 3)
    assert fractions["from_scores"] == pytest.approx(2 / 3)
    assert gated_fraction({"x": {"score": 0.1}}, gate=0.2) == {"from_timings": None, "from_scores": 0.0}


def test_report_goes_into_its_own_section() -> None:
    document = f"# Benchmarks\n\n## Decoding\n\ntable\n\n{SECTION}\n\nmethod\n\n{PLACEHOLDER}\n\n## GPU\n\ngpu table\n"
    once = append_to_section(document, "### run 1\n\n| a |\n")
    assert once == (f"# Benchmarks\n\n## Decoding\n\ntable\n\n{SECTION}\n\nmethod\n\n### run 1\n\n| a |\n\n"
                    "## GPU\n\ngpu table\n")
    twice = append_to_section(once, "### run 2\n")
    assert twice.index("### run 1") < twice.index("### run 2") < twice.index("## GPU")
    last = append_to_section(f"{SECTION}\n\nmethod\n\n{PLACEHOLDER}\n", "### run\n")
    assert last == f"{SECTION}\n\nmethod\n\n### run\n"
    assert append_to_section("# Benchmarks\n", "### run\n") == f"# Benchmarks\n\n{SECTION}\n\n### run\n"
