"""Issue #6's monitoring, checked against a real Prometheus scraping the real service.

* promtool accepts the shipped scrape configuration and rules, and the rules pass their unit tests
  (deploy/prometheus/*.test.yml: drift, error rate, readiness, delivery, GPU, down, outputs pending, C-STOREs
  refused for lack of space, readers' disagreement with STAT results);
* the Grafana dashboard is well formed (Grafana itself is not installed: its structure is checked here);
* one `bentoml serve` with the PACS side on (a delivery destination that is down), one Prometheus (Debian's
  package) scraping it every second with the shipped rules file: traffic over HTTP and C-STORE, a reader's
  verdict on a study the intake triaged (the reader-feedback count), then every
  metric name used by any dashboard panel or rule expression returns data from the query API, every rule
  evaluates without error, the delivery alerts go pending on the real labels, and every dashboard query runs.

Metric names are read from the PromQL itself (`tests.prometheus.metric_names`), so a new panel or rule with a
misspelt metric fails here.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE

from tests import realdata as registry
from tests.http.test_app_triage import metrics_text, multipart, post
from tests.prometheus import (
    DEPLOY,
    SHIPPED_RULES,
    PrometheusServer,
    PrometheusUnavailable,
    metric_names,
    promtool,
    running_prometheus,
    scrape_config_for,
)
from tests.servers import REPO, bento_server, free_port, wait_port

DASHBOARD = REPO / "deploy" / "grafana" / "ptx-triage.json"
ROWS = ("Traffic", "Latency", "Batching", "Model behaviour", "PACS", "Resources")
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "15s", "$job": ".*", "$instance": ".*"}

# Exported only where NVML sees an NVIDIA GPU (the model worker samples them): a CPU box has no series, so they
# are exempt from the "returns data" check, and only they. The GPU alert (PtxGpuNotUsed) reads ptx_gpu_visible
# and ptx_model_info, which every box exports, so it is evaluated here all the same.
GPU_ONLY = {"ptx_gpu_memory_used_bytes", "ptx_gpu_memory_total_bytes"}

DATA_TIMEOUT_S = 120


# --------------------------------------------------------------------------------------------------------------
# What the dashboard and the rules use


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every template variable's metric selector."""
    found = [(f"panel {panel['title']!r}", target["expr"])
             for panel in all_panels(board) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, f"variable {variable['name']}: unexpected query {query!r}"
            found.append((f"variable ${variable['name']}", selector.group(1)))
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(SHIPPED_RULES.read_text())["groups"] for rule in group["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in rules()]


def used_names() -> dict[str, list[str]]:
    """Metric name → where it is used (dashboard panels and variables, recording and alerting rules)."""
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_exprs(dashboard()) + rule_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, []).append(where)
    return used


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# --------------------------------------------------------------------------------------------------------------
# Static checks


def test_metric_names_are_read_from_promql():
    expr = ('sum by (job, le) (rate(ptx_a_bucket{stage="total", x=~"a{1}|by"}[$__rate_interval])) '
            '/ on (job) group_left(name) ptx_b offset 7d > bool 1e3 and ptx:rec:6h @ start() '
            'or vector(0) unless label_replace(up, "dst", "$1", "src", "(.*)") * -ptx_c[1h:5m]')
    assert metric_names(expr) == {"ptx_a_bucket", "ptx_b", "ptx:rec:6h", "up", "ptx_c"}
    assert metric_names("sum without (instance) (rate(ptx_typo_totl[5m]))") == {"ptx_typo_totl"}


def test_promtool_accepts_config_and_rules_and_the_rule_unit_tests_pass():
    try:
        checks = [promtool("check", "config", "prometheus.yml"), promtool("check", "rules", SHIPPED_RULES.name),
                  promtool("test", "rules", "ptx-rules.test.yml", "ptx-drift.test.yml")]
    except PrometheusUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    for check in checks:
        assert check.returncode == 0, f"{' '.join(check.args[1:])}:\n{check.stdout}\n{check.stderr}"
    assert "SUCCESS: 1 rule files found" in checks[0].stdout  # the config names the shipped rules file
    assert sorted(path.name for path in DEPLOY.glob("*.test.yml")) == ["ptx-drift.test.yml", "ptx-rules.test.yml"]


def test_every_alert_has_for_severity_and_runbook_annotations():
    alerts = [rule for rule in rules() if "alert" in rule]
    required = {"PtxServiceDown", "PtxNotReady", "PtxHighErrorRate", "PtxLatencyP99High", "PtxSpoolDepthGrowing",
                "PtxDeliveryAttemptsFailing", "PtxDeliveriesFailed", "PtxPositiveRateDrift",
                "PtxScoreDistributionDrift", "PtxGpuNotUsed", "PtxOutputsPending", "PtxDicomRefusedNoSpace",
                "PtxNotificationsFailing", "PtxNotificationGivenUp", "PtxOutOfDistributionShareRising",
                "PtxStatDisagreementRising"}
    assert required <= {rule["alert"] for rule in alerts}
    for rule in alerts:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
    drift = [rule for rule in alerts if "Drift" in rule["alert"]]
    assert all("offset 7d" in rule["expr"] and ">= 200" in rule["expr"] for rule in drift), \
        "drift alerts compare against last week and guard against small samples"


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    panels = list(all_panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == list(ROWS)
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # Every row the issue asks for has panels under it (rows are in order of y; panels follow their row).
    row_y = sorted((panel["gridPos"]["y"], panel["title"]) for panel in panels if panel["type"] == "row")
    for (y, title), (next_y, _) in zip(row_y, row_y[1:] + [(10**6, "")]):
        assert any(y < panel["gridPos"]["y"] < next_y for panel in panels if panel["type"] != "row"), \
            f"row {title!r} is empty"
    assert GPU_ONLY <= set(used_names()), "the GPU allowlist names metrics the dashboard no longer uses"


def test_the_listener_reports_each_c_store_outcome(tmp_path):
    """ptx_dicom_received_total{outcome}'s source: one outcome per answered C-STORE, the answer unchanged."""
    from tests.pacs.test_dicom_listener import (
        FullSpool,
        receiver,
        send_with_pynetdicom,
        small_film,
    )

    outcomes: list[str] = []
    good, no_study = small_film(), small_film(StudyInstanceUID=None)
    with receiver(tmp_path / "a", on_outcome=outcomes.append) as rx:
        statuses = [s.Status for s in send_with_pynetdicom(rx.port, [good, no_study, good])]
    assert statuses == [0x0000, 0xC000, 0x0000] and outcomes == ["received", "refused", "duplicate"]
    with receiver(tmp_path / "b", spool=FullSpool(tmp_path / "full"), on_outcome=outcomes.append) as rx:
        assert send_with_pynetdicom(rx.port, [small_film()])[0].Status == 0xA700
    assert outcomes[-1] == "failed"


def test_resource_sampler_sets_memory_and_gpu_gauges():
    """In-process (no multiprocess directory): this process's RSS under its role, and one gauge pair per GPU."""
    from prometheus_client import REGISTRY

    from service.metrics import sample_resources

    sample_resources("test", gpu=True, gpu_memory=lambda: [(3 << 30, 80 << 30), (1 << 30, 80 << 30)])
    rss = REGISTRY.get_sample_value("ptx_process_resident_memory_bytes", {"role": "test"})
    assert rss is not None and rss > 20e6
    assert REGISTRY.get_sample_value("ptx_gpu_memory_used_bytes", {"gpu": "1"}) == 1 << 30
    assert REGISTRY.get_sample_value("ptx_gpu_memory_total_bytes", {"gpu": "0"}) == 80 << 30


# --------------------------------------------------------------------------------------------------------------
# The real thing: service + Prometheus


def c_store(port: int, paths: list[Path]) -> list[int]:
    """Send each file over one association (pynetdicom, the files' own transfer syntaxes); the statuses."""
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title="MODALITY1")
    for pair in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets):
        ae.add_requested_context(*pair)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    association = ae.associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    assert association.is_established, "the DICOM listener refused the association"
    try:
        return [int(association.send_c_store(ds).Status) for ds in datasets]
    finally:
        association.release()


def overload(base: str, data: bytes, attempts: int = 5) -> None:
    """Concurrent requests against PTX_MAX_IN_FLIGHT=1 until at least one is answered 503 (overloaded)."""
    for _ in range(attempts):
        with ThreadPoolExecutor(8) as pool:
            statuses = [status for status, _, _ in
                        pool.map(lambda _: post(f"{base}/v1/triage?mask=none", data, "application/dicom"), range(8))]
        if 503 in statuses:
            return
    pytest.fail(f"no 503 from {attempts} bursts of 8 concurrent requests with PTX_MAX_IN_FLIGHT=1")


def wait_until(check: Any, timeout_s: float, what: Any) -> Any:
    """Poll `check()` until it returns something true; fail with `what()` (a message built from the last try)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(what(), pytrace=False)
        time.sleep(1.0)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, realdata) -> Iterator[tuple[str, int, PrometheusServer]]:
    """The service (PACS side on, its one destination down, at most 1 film in flight) and Prometheus scraping it."""
    tmp = tmp_path_factory.mktemp("observability")
    listener_port, nobody_port = free_port(), free_port()
    env = {"PTX_DATA_DIR": str(tmp / "data"), "PTX_DICOM_PORT": str(listener_port), "PTX_DICOM_HOST": "127.0.0.1",
           "PTX_DESTINATIONS": f"down=dicom://NOBODY@127.0.0.1:{nobody_port}", "PTX_DELIVERY_MAX_ATTEMPTS": "2",
           # the second attempts come 1.6-2 s after the first: the failure counter grows across 1 s scrapes
           "PTX_DELIVERY_BACKOFF_S": "2", "PTX_DELIVERY_BACKOFF_MAX_S": "2", "PTX_MAX_IN_FLIGHT": "1",
           # a webhook receiver that is down: the notification series exist (and count failures) for the rules
           "PTX_NOTIFY_WEBHOOK": f"http://127.0.0.1:{free_port()}/hook", "PTX_NOTIFY_WEBHOOK_SECRET": "s" * 32}
    try:
        with bento_server(tmp / "service.log", env=env, timeout_s=180) as base:
            config = scrape_config_for(base.removeprefix("http://"))
            with running_prometheus(config, tmp / "prometheus") as prometheus:
                yield base, listener_port, prometheus
    except PrometheusUnavailable as error:
        pytest.fail(str(error), pytrace=False)


def test_every_dashboard_and_alert_metric_has_data_in_a_real_prometheus(monitored, realdata):
    base, listener_port, prometheus = monitored
    wait_until(lambda: prometheus.query('up{job="ptx-triage"} == 1'), 30,
               lambda: f"Prometheus does not scrape the service: {prometheus.api('targets')}")

    # Traffic over HTTP: every real chest film, a batch, refusals of three kinds, and 503s for capacity.
    chest = [realdata / entry.path for entry in registry.CHEST]
    for path in chest:
        status, answer, _ = post(f"{base}/v1/triage?mask=none", path.read_bytes(), "application/dicom")
        assert status == 200, (path.name, answer)
    body, content_type = multipart([(path.name, path.read_bytes()) for path in chest[:2]])
    assert post(f"{base}/v1/triage/batch?mask=none", body, content_type)[0] == 200
    assert post(f"{base}/v1/triage", (realdata / "other/CT_small.dcm").read_bytes(), "application/dicom")[0] == 422
    assert post(f"{base}/v1/triage", (realdata / "corrupt/badVR.dcm").read_bytes(), "application/dicom")[0] == 422
    assert post(f"{base}/v1/triage", b"not a film", "text/plain")[0] == 415
    overload(base, chest[0].read_bytes())

    # Traffic over DICOM: the chest films (both SIIM copies share a SOP Instance UID with other bytes: the second
    # is refused as a conflict, 0xC001, issue 13 §3) and a CR extremity film, acknowledged, then refused by the
    # intake as not_chest. Results go to a destination that is down: failed attempts, then failed deliveries.
    wait_port(listener_port, timeout_s=60)
    sent = chest + [realdata / "other/cr_extremity_j2k_mono1.dcm"]
    uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in sent]
    assert c_store(listener_port, sent) == [0 if uid not in uids[:index] else 0xC001 for index, uid in enumerate(uids)]

    # A reader's verdict (issue 14 §3) on a study the intake triaged: the source of ptx_reader_feedback_total.
    def triaged() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{base}/v1/worklist?status=triaged", timeout=30) as response:
            return [item for item in json.loads(response.read())["items"] if item["priority"]]

    study = wait_until(triaged, 60, lambda: "no study on the worklist was triaged from the C-STOREs")[0]
    ack = urllib.request.Request(f"{base}/v1/studies/{study['study_uid']}/ack?priority={study['priority']}"
                                 "&by=qa.reader&verdict=disagree", method="POST")
    with urllib.request.urlopen(ack, timeout=30) as response:
        assert json.loads(response.read())["verdict"]["verdict"] == "disagree"

    used = used_names()
    wanted = set(used) - GPU_ONLY
    pattern = "|".join(sorted(re.escape(name) for name in wanted))

    def with_data() -> set[str]:
        found = prometheus.query(f'count by (__name__) ({{__name__=~"{pattern}"}})')
        return {series["metric"]["__name__"] for series in found}

    def missing() -> str:
        lacking = sorted(wanted - with_data())
        return (f"no data in Prometheus after {DATA_TIMEOUT_S} s for {len(lacking)} metric(s): "
                + "; ".join(f"{name} (used by {', '.join(used[name])})" for name in lacking))

    wait_until(lambda: with_data() >= wanted, DATA_TIMEOUT_S, missing)

    # The C-STORE counter and the intake's rejection, as Prometheus sees them.
    def outcomes() -> dict[str, float]:
        return {s["metric"]["outcome"]: float(s["value"][1])
                for s in prometheus.query("sum by (outcome) (ptx_dicom_received_total)")}

    expected = {"received": len(sent) - 1, "conflict": 1}
    wait_until(lambda: outcomes() == expected, 15, lambda: f"C-STOREs by outcome: {outcomes()}, expected {expected}")
    wait_until(lambda: prometheus.query('ptx_rejections_total{code="not_chest"} == 1'), 30,
               lambda: "the intake's not_chest refusal is not counted in ptx_rejections_total")

    # Each process samples its own memory (the process collector does not run in multiprocess mode).
    memory = {s["metric"]["role"]: float(s["value"][1]) for s in prometheus.query("ptx_process_resident_memory_bytes")}
    assert set(memory) == {"edge", "models"} and min(memory.values()) > 50e6, memory

    # The delivery alerts see the real labels: a destination that is down makes them pending (their `for:`
    # keeps them from firing within the test); the service is up, ready and, here, not a GPU box on the CPU.
    def states() -> dict[str, str]:
        return {rule["name"]: rule["state"] for rule in prometheus.rules() if rule["type"] == "alerting"}

    wait_until(lambda: all(states()[name] in ("pending", "firing")
                           for name in ("PtxDeliveryAttemptsFailing", "PtxDeliveriesFailed")),
               60, lambda: f"delivery alerts not pending with a destination down: {states()}")
    text = metrics_text(base)
    gpu_on_cpu = "ptx_gpu_visible 1.0" in text and 'provider="cpu"' in text
    assert states()["PtxGpuNotUsed"] == ("pending" if gpu_on_cpu else "inactive")
    assert states()["PtxServiceDown"] == states()["PtxNotReady"] == "inactive"
    # Results are made (only their delivery fails) and the spool has room: these two stay quiet on real labels.
    assert states()["PtxOutputsPending"] == states()["PtxDicomRefusedNoSpace"] == "inactive"
    assert states()["PtxStatDisagreementRising"] == "inactive"  # one verdict: below the minimum count
    if "ptx_gpu_visible 1.0" in text:  # a GPU box: the allowlisted GPU metrics must have data after all
        wait_until(lambda: all(prometheus.query(name) for name in GPU_ONLY), 30,
                   lambda: f"a GPU is visible, yet no data for {sorted(GPU_ONLY)} (NVML not readable?)")

    # Every rule evaluated without error, and every dashboard query runs and (nearly all) return series.
    loaded = prometheus.rules()
    assert {rule["name"] for rule in loaded} == {rule.get("alert") or rule.get("record") for rule in rules()}
    broken = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
    assert not broken, f"rules that did not evaluate: {broken}"
    empty = []
    for where, expr in dashboard_exprs(dashboard()):
        try:
            if not prometheus.query(grafana_to_promql(expr)):
                empty.append((where, expr))
        except ValueError as error:
            pytest.fail(f"{where}: {error}", pytrace=False)
    # Every panel query shows something, except last week's baseline (a fresh Prometheus has no history) and
    # the GPU-only metrics.
    unexplained = [(where, expr) for where, expr in empty
                   if "offset 7d" not in expr and not metric_names(expr) & GPU_ONLY]
    assert not unexplained, f"dashboard queries without any series: {unexplained}"

    # And the other way round: every metric family of ours is on the dashboard or in a rule.
    families = set(re.findall(r"^# TYPE (ptx_\w+) ", text, flags=re.MULTILINE))
    unused = {family for family in families
              if not any(re.fullmatch(rf"{family}(_total|_bucket|_sum|_count)?", name) for name in used)}
    assert not unused, f"metrics exported but neither on the dashboard nor in a rule: {sorted(unused)}"
