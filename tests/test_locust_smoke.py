"""The Locust scenarios, for a few seconds each, against a real `bentoml serve`; and the numbers they and the
capacity report compute.

One server for the module, with a small admission limit (PTX_MAX_IN_FLIGHT=4) so that the burst's spike
of 16 users must be shed with 503 while 2 users never are. Each scenario runs as `python -m locust
--headless` (as documented), and the assertions read its CSVs: Locust's own stats and our summary row.
Speed figures are not asserted here (they come from `python -m load_tests.capacity`).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from load_tests.capacity import (
    SECTION,
    Step,
    analyse,
    append_to_section,
    half_load_plan,
    stop_reason,
)
from load_tests.corpus import MIX, Corpus, Film, build, load, parse_mix, pick
from load_tests.scenarios.summary import Sample, expectation_problem, summarise
from tests.servers import REPO, bento_server

SCENARIOS = REPO / "load_tests" / "scenarios"
CORPUS_COUNT, CORPUS_SEED = 48, 7  # 16 positives, 5 negatives with the demo models: enough for a smoke


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Corpus]:
    """The server and the corpus, built side by side (the server spends most of its start-up waiting)."""
    folder = tmp_path_factory.mktemp("locust")
    with ThreadPoolExecutor(1) as pool:
        building = pool.submit(build, folder / "corpus", CORPUS_COUNT, CORPUS_SEED)
        with bento_server(folder / "server.log", env={"PTX_DATA_DIR": str(folder / "data"),
                                                      "PTX_MAX_IN_FLIGHT": "4"}, timeout_s=300) as base:
            building.result()
            yield base, load(folder / "corpus")


def locust(scenario: str, base: str, corpus: Corpus, prefix: Path, *options: str) -> tuple[dict, dict[str, dict]]:
    """Run a scenario headless; its summary row and Locust's final counts by request name ({"requests",
    "failures"}). The counts come from --json-file, written after the run: Locust rewrites its _stats.csv
    once a second while running and not at the end, so that file can miss the last second."""
    command = [sys.executable, "-m", "locust", "-f", str(SCENARIOS / f"{scenario}.py"), "--headless",
               "--host", base, "--csv", str(prefix), "--only-summary", "--corpus", str(corpus.folder),
               "--json-file", f"{prefix}_final", "--exit-code-on-error", "0", *options]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SUMMARY scenario=" + scenario in result.stdout + result.stderr
    with Path(f"{prefix}_summary.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert Path(f"{prefix}_stats.csv").is_file()  # Locust's own CSVs are there too
    entries = json.loads(Path(f"{prefix}_final.json").read_text())
    stats = {entry["name"]: {"requests": entry["num_requests"], "failures": entry["num_failures"]} for entry in entries}
    return row, stats


def no_failures(stats: dict[str, dict]) -> None:
    failing = {name: counts["failures"] for name, counts in stats.items() if counts["failures"]}
    assert not failing, failing


# --- the corpus -------------------------------------------------------------------------------------------

def test_corpus_holds_what_the_mix_needs(service) -> None:
    _, corpus = service
    manifest = corpus.manifest
    operating_point = manifest["operating_point"]
    films = [film for films in corpus.pools.values() for film, _ in films]
    assert {f.kind for f in films} == {"positive", "negative", "reject"}
    for film in films:
        if film.kind == "positive":
            assert film.label == "pneumothorax" and film.score >= operating_point and film.status == 200
        elif film.kind == "negative":
            assert film.label == "no_pneumothorax" and film.score < operating_point and film.status == 200
    rejects = {(f.status, f.code) for f in films if f.kind == "reject"}
    assert rejects == {(400, "not_dicom"), (422, "not_chest"), (422, "not_radiograph")}
    encodings = {f.encoding for f in films if f.kind != "reject"}
    assert "Explicit VR Little Endian" in encodings and len(encodings) >= 3  # uncompressed and compressed
    assert not any(Path(f.path).is_absolute() or ".." in f.path for f in films)  # all inside the corpus


def test_the_mix_draws_22_percent_positives(service) -> None:
    _, corpus = service
    rng = random.Random(0)
    kinds = collections.Counter(pick(rng, corpus)[0].kind for _ in range(20_000))
    total = sum(MIX.values())
    for kind, weight in MIX.items():
        assert kinds[kind] / 20_000 == pytest.approx(weight / total, abs=0.01), kinds
    first = [pick(random.Random("1:0"), corpus)[0].path for _ in range(3)]
    assert first == [pick(random.Random("1:0"), corpus)[0].path for _ in range(3)]  # seeded: repeatable
    assert parse_mix("positive=1,negative=0,reject=0") == {"positive": 1.0, "negative": 0.0, "reject": 0.0}
    for bad in ("positive=1", "positive=1,negative=1,reject=1,positive=2", "positive=0,negative=0,reject=0",
                "positive=1,negative=-1,reject=1", "positives=1,negative=1,reject=1"):
        with pytest.raises(ValueError, match="mix"):
            parse_mix(bad)


# --- the scenarios, for real ------------------------------------------------------------------------------

def test_steady_smoke(service, tmp_path: Path) -> None:
    base, corpus = service
    row, stats = locust("steady", base, corpus, tmp_path / "steady", "-u", "2", "-r", "2", "-t", "6s")
    no_failures(stats)
    requests = int(row["requests"])
    assert requests >= 10 and int(row["failures"]) == 0 and int(row["shed_503"]) == 0
    assert sum(counts["requests"] for counts in stats.values()) == requests  # our record saw what Locust counted
    assert int(row["triaged"]) + int(row["rejects_ok"]) == requests
    assert any(name.startswith("positive") for name in stats) and any(name.startswith("negative") for name in stats)
    # Positive share of the requests: binomial around 22 %, loose (4 sd) for a few dozen requests.
    sd = math.sqrt(0.22 * 0.78 / requests)
    assert abs(float(row["positive_share"]) - 0.22) <= 4 * sd + 0.02
    assert 0 < float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])
    assert float(row["throughput_films_s"]) > 0
    with Path(f"{tmp_path / 'steady'}_windows.csv").open() as handle:
        windows = list(csv.DictReader(handle))
    assert len(windows) == 10 and sum(int(w["requests"]) for w in windows) == requests


def test_burst_sheds_with_503_and_recovers(service, tmp_path: Path) -> None:
    base, corpus = service
    row, stats = locust("burst", base, corpus, tmp_path / "burst", "--burst-low-users", "2",
                        "--burst-peak-users", "16", "--burst-low-s", "2", "--burst-peak-s", "3",
                        "--burst-recover-s", "6")
    no_failures(stats)  # 503s are counted apart, not as failures
    assert int(row["failures"]) == 0
    assert int(row["shed_503"]) > 0 and stats["shed 503"]["requests"] == int(row["shed_503"])
    assert float(row["peak_shed_share"]) > 0
    assert row["recovered"] == "True", row  # answers, no 503 and no failure in the late half of the recovery
    with Path(f"{tmp_path / 'burst'}_windows.csv").open() as handle:
        windows = {w["window"]: w for w in csv.DictReader(handle)}
    assert list(windows) == ["low", "peak", "recover-early", "recover-late"]
    assert int(windows["low"]["shed_503"]) == 0 and int(windows["peak"]["shed_503"]) > 0
    assert int(windows["peak"]["users_max"]) == 16 and int(windows["recover-late"]["users_max"]) == 2


def test_soak_paces_its_users_and_rejects_get_their_codes(service, tmp_path: Path) -> None:
    base, corpus = service
    # A reject-heavy mix, so the three refusals surely come up in a few seconds.
    row, stats = locust("soak", base, corpus, tmp_path / "soak", "-u", "2", "-r", "2", "-t", "5s",
                        "--pace-s", "0.5", "--mix", "positive=22,negative=38,reject=40")
    no_failures(stats)  # a reject answered with another status or code would be a failure
    requests = int(row["requests"])
    assert 6 <= requests <= 24  # 2 users x 1 request per 0.5 s x ~5 s, give or take start-up and a slow answer
    assert int(row["rejects_ok"]) >= 1
    assert sum(counts["requests"] for name, counts in stats.items() if name.startswith("reject ")) \
        == int(row["rejects_ok"])
    assert "p99_drift" in row and "throughput_drift" in row


# --- the numbers, without a server ------------------------------------------------------------------------

def test_expectations_of_answers() -> None:
    positive = Film("positive", "a.dcm", "RLE Lossless", 0.9, 200, None, "pneumothorax")
    reject = Film("reject", "r.bin", "none", None, 400, "not_dicom", None)
    assert expectation_problem(positive, 200, {"score": 0.9, "label": "pneumothorax"}) is None
    assert "expected label" in expectation_problem(positive, 200, {"score": 0.05, "label": "no_pneumothorax"})
    assert "without a score" in expectation_problem(positive, 200, {"label": "pneumothorax"})
    assert "expected 200" in expectation_problem(positive, 500, {"error": {"code": "internal_error"}})
    assert expectation_problem(reject, 400, {"error": {"code": "not_dicom", "message": "x"}}) is None
    assert "not_dicom" in expectation_problem(reject, 400, {"error": {"code": "invalid_parameter"}})
    assert "expected 400" in expectation_problem(reject, 200, {"score": 0.1})


def test_summary_of_known_samples() -> None:
    samples = [Sample(i * 0.1, i * 0.1 + 0.1 * (i + 1), "positive" if i % 5 == 0 else "negative", "ok", 2)
               for i in range(10)]  # latencies 100 .. 1000 ms
    samples += [Sample(0.5, 0.6, "reject", "ok", 2), Sample(0.6, 0.7, "negative", "shed", 2),
                Sample(0.7, 0.8, "negative", "failed", 2), Sample(5.0, 5.1, "negative", "ok", 2)]
    row = summarise(samples, 0.0, 2.0)  # the last sample started after the window: left out
    assert (row["requests"], row["triaged"], row["rejects_ok"], row["shed_503"], row["failures"]) == (13, 10, 1, 1, 1)
    assert row["shed_share"] == pytest.approx(1 / 13, abs=1e-4)
    assert row["positive_share"] == pytest.approx(2 / 12, abs=1e-4)  # answered (not shed) requests
    assert row["p50_ms"] == pytest.approx(550.0) and row["p99_ms"] == pytest.approx(991.0)
    assert row["duration_s"] == pytest.approx(1.9)  # window start to the last answer (1.9 s)
    assert row["throughput_films_s"] == pytest.approx(10 / 1.9, abs=1e-3)
    empty = summarise(samples, 10.0, 11.0)
    assert empty["requests"] == 0 and math.isnan(empty["p99_ms"]) and empty["throughput_films_s"] == 0


def step(users: int, throughput: float, p99: float, failures: int = 0, shed: int = 0, p50: float = 100.0) -> Step:
    return Step(f"u{users}", users, None, {"throughput_films_s": throughput, "p99_ms": p99, "p50_ms": p50,
                                           "failures": failures, "shed_503": shed}, 1.0)


def test_capacity_analysis() -> None:
    ladder = [step(1, 10, 150, p50=80), step(2, 18, 300), step(4, 30, 700), step(8, 31, 1500),
              step(16, 31.5, 2600)]
    result = analyse(ladder, bound_ms=2000)
    assert result.single_ms == 80 and result.single_p99_ms == 150
    assert result.sustainable.users == 8  # highest throughput with p99 under the bound
    assert result.top_throughput == 31.5 and result.saturation.users == 4  # 30 >= 0.95 x 31.5
    assert result.crossed.users == 16
    shedding = analyse([step(1, 10, 150), step(2, 20, 300, shed=3)], bound_ms=2000)
    assert shedding.sustainable.users == 1  # 503s disqualify a step
    with pytest.raises(ValueError, match="one user"):
        analyse([step(2, 10, 100)], bound_ms=2000)
    users, pace = half_load_plan(30.0, single_s=0.1)
    assert users / pace == pytest.approx(15.0) and pace >= 1.0  # 0.5 x saturation, idle users
    users, pace = half_load_plan(30.0, single_s=0.5)
    assert users / pace == pytest.approx(15.0) and pace >= 2.0
    assert stop_reason(step(4, 30, 2500), 2000).startswith("p99")
    assert "failed" in stop_reason(step(4, 30, 500, failures=2), 2000)
    assert "503" in stop_reason(step(4, 30, 500, shed=1), 2000)
    assert stop_reason(step(4, 30, 500), 2000) is None


def test_capacity_report_goes_into_its_section() -> None:
    document = f"# Benchmarks\n\n{SECTION}\n\nhow\n\n## Later\n\nother\n"
    once = append_to_section(document, "### run 1\n")
    assert once == f"# Benchmarks\n\n{SECTION}\n\nhow\n\n### run 1\n\n## Later\n\nother\n"
    twice = append_to_section(once, "### run 2\n")
    assert twice.index("### run 1") < twice.index("### run 2") < twice.index("## Later")
    assert append_to_section("# B\n", "### run\n") == f"# B\n\n{SECTION}\n\n### run\n"
