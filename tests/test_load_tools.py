"""The benchmark's tools: the naive baseline server answers what the cascade answers, and the numbers
the benchmark reports (latency summary, model-only limit, agreement) are computed as documented."""

from __future__ import annotations

import asyncio
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from load_tests import bench_compressed as compressed
from load_tests.bench_service import (
    PLACEHOLDER,
    SECTION,
    Phase,
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
    document = f"{SECTION}\n\nrun\n\n## Other\n\nold\n\nNot yet.\n"
    custom = append_to_section(document, "### new\n", "## Other", "Not yet.")
    assert custom == f"{SECTION}\n\nrun\n\n## Other\n\nold\n\n### new\n"


# --- the compressed-corpus benchmark (load_tests/bench_compressed.py) ---------------------------------------

def test_compressed_corpus_real_films_by_transfer_syntax_and_synthetic_ones_reencoded(realdata: Path,
                                                                                      tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import JPEG2000, JPEG2000Lossless

    real = compressed.real_corpus(realdata / "chest", repeat=2)
    groups = {film.name: film.group for film in real}
    assert len(groups) == len(real) == 8, "each post of a film has a name of its own"
    assert groups["canon_dx_j2k_lossless_mono1_inverse#1"] == groups["philips_cr_j2k_lossy_mono1#0"] == "real JPEG 2000"
    assert groups["siim_cr_jpegbaseline_mono2#0"] == "real JPEG"
    with pytest.raises(SystemExit, match="real chest films not found at .*PTX_REALDATA"):
        compressed.real_corpus(tmp_path / "absent", repeat=1)

    synthetic = compressed.synthetic_corpus(1, 3, tmp_path)
    syntaxes = {film.group: pydicom.dcmread(io.BytesIO(film.data)).file_meta.TransferSyntaxUID for film in synthetic}
    assert syntaxes == {compressed.SYNTH_LOSSLESS: JPEG2000Lossless, compressed.SYNTH_LOSSY: JPEG2000}
    cached = sorted((tmp_path / "compressed-n1-s3").rglob("*.dcm"))
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert len(cached) == 2 and compressed.synthetic_corpus(1, 3, tmp_path) == synthetic
    assert [path.stat().st_mtime_ns for path in cached] == stamps, "encoded once, then read from the cache"

    by_group = compressed.by_group(real + synthetic)
    assert list(by_group) == list(compressed.GROUPS) and [len(v) for v in by_group.values()] == [4, 4, 1, 1]
    warm = compressed.warmup_films(by_group, 6)
    assert [name.split("#")[0].split("/")[0] for name, _ in warm] == [
        "canon_dx_j2k_lossless_mono1_inverse", "siim_cr_jpegbaseline_mono1_flagged", "j2k-lossless", "j2k-lossy",
        "philips_cr_j2k_lossy_mono1", "siim_cr_jpegbaseline_mono2"]


def _phase(latencies_ms: dict[str, float], scores: dict[str, float], decode_ms: float, wall_s: float,
           errors: int = 0) -> Phase:
    """A pass as bench_service.drive records it, from known latencies, scores and decode times."""
    answers = {name: {"score": score, "label": "pneumothorax" if score >= 0.5 else "no_pneumothorax",
                      "models": {"classifier": "c 1"}, "timings_ms": {"decode": decode_ms}}
               for name, score in scores.items()}
    latencies = {name: ms / 1000 for name, ms in latencies_ms.items()}
    return Phase("pass", 4, summarise(list(latencies.values()), errors, wall_s), 0.5, 0.1, answers,
                 ["x: 503"] * errors, latencies)


def test_compressed_figures_pool_the_jpeg_2000_groups_and_give_the_ratios() -> None:
    scores = {"a": 0.2, "b": 0.7}
    moved = {"a": 0.203, "b": 0.69}
    rows = {
        "group 1": {"naive": [_phase({"a": 800, "b": 1200}, scores, 500, 2.0)],
                    "reduced off": [_phase({"a": 600, "b": 1000}, scores, 400, 1.0)],
                    "reduced on": [_phase({"a": 100, "b": 300}, moved, 40, 0.25)]},
        "pooled": {"naive": [_phase({"a": 800, "b": 1200}, scores, 500, 2.0),
                             _phase({"c": 100, "d": 100}, {"c": 0.1, "d": 0.1}, 20, 0.5)],
                   "reduced off": [_phase({"a": 600, "b": 1000}, scores, 400, 1.0),
                                   _phase({"c": 100, "d": 100}, {"c": 0.1, "d": 0.1}, 20, 0.5)],
                   "reduced on": [_phase({"a": 100, "b": 300}, moved, 40, 0.25),
                                  _phase({"c": 50, "d": 50}, {"c": 0.1, "d": 0.1}, 10, 0.25, errors=1)]},
    }
    one = compressed.group_row(rows["group 1"])
    assert one["films"] == 2 and one["servers"]["reduced on"]["throughput"] == pytest.approx(8.0)
    assert one["on_vs_off_throughput"] == pytest.approx(4.0)  # 8 films/s against 2
    assert one["on_vs_off_mean_latency"] == pytest.approx(800 / 200)
    assert one["on_vs_naive_throughput"] == pytest.approx(8.0)
    assert one["decode_ms"] == {"naive": 500, "reduced off": 400, "reduced on": 40}
    assert one["on_vs_off"]["max_abs_score_difference"] == pytest.approx(0.01)
    assert one["on_vs_off"]["label_mismatches"] == [] and one["off_vs_naive"]["max_abs_score_difference"] == 0

    both = compressed.group_row(rows["pooled"])
    on = both["servers"]["reduced on"]
    assert (on["requests"], on["ok"], on["errors"]) == (5, 4, 1), "every pass's latencies and errors"
    assert on["wall_s"] == pytest.approx(0.5) and on["throughput"] == pytest.approx(8.0), "successes / walls added"
    assert on["mean_ms"] == pytest.approx(125)
    assert both["on_vs_off_throughput"] == pytest.approx(8.0 / (4 / 1.5))
    assert both["decode_ms"]["reduced off"] == pytest.approx((400 * 2 + 20 * 2) / 4)

    report = {"date": "d", "command": "python -m load_tests.bench_compressed", "machine": "m", "models": "c + s",
              "settings": {"hflip_tta": True, "mask": "rle", "service_env": {}, "warmup": 8, "seed": 0},
              "films": {"group 1": 2}, "load": (0.5, 0.5), "off_vs_naive_max": 0.0,
              "tables": {4: {"group 1": one, compressed.ALL_J2K: both},
                         16: {compressed.ALL_J2K: {**both, "on_vs_off_throughput": 5.0}}}}
    text = compressed.markdown(report)
    assert "| group 1 | 2 | 1.00 | 1,000 / 1,000 / 1,196 | 2.00 |" in text
    assert "| **4.00×** | 4.00× | 8.00× | 0.0100 |" in text
    assert "3.00×, NOT met at concurrency 4" in text and "5.00×, met at concurrency 16" in text



def test_cpu_split_reads_each_threads_own_cpu_time():
    """`cpu_split.thread_cpu`: a thread that burns CPU is charged for it, one that sleeps is not."""
    import threading
    import time

    from load_tests.cpu_split import thread_cpu

    ids: dict[str, int] = {}
    done = threading.Event()

    def burn() -> None:
        ids["burn"] = threading.get_native_id()
        started, spins = time.perf_counter(), 0
        while time.perf_counter() - started < 0.4:
            spins += 1
        done.wait()

    def sleep() -> None:
        ids["sleep"] = threading.get_native_id()
        done.wait()

    workers = [threading.Thread(target=burn), threading.Thread(target=sleep)]
    before = thread_cpu(os.getpid())
    for worker in workers:
        worker.start()
    time.sleep(0.6)
    after = thread_cpu(os.getpid())
    done.set()
    for worker in workers:
        worker.join()
    assert after[ids["burn"]] - before.get(ids["burn"], 0.0) >= 0.2
    assert after[ids["sleep"]] - before.get(ids["sleep"], 0.0) <= 0.05
