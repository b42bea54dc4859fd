"""Request metrics by route template (issue 13 §6): a real `bentoml serve` flooded with random paths and study URLs.

BentoML's own request metrics label each series with the raw URL path: before this change, 100 requests to new
paths added about 2,000 lines to `/metrics` and every study viewed put its Study Instance UID into a label. Here
the edge's request metrics are ours (`ptx_http_requests_total`, `ptx_http_request_seconds`, by route template),
BentoML's are off on the edge (the model worker keeps its adaptive-batching histogram), and a second flood of
entirely new paths and UIDs must add no series at all.

The unit tests drive the middleware in a Starlette application built like BentoML's (plain routes and passive
mounts of our FastAPI apps, auth between the two middlewares) to pin the labels of each kind of request.
"""

from __future__ import annotations

import http.client
import re
import secrets
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from service.http.request_metrics import (
    OTHER,
    MetricsEndpoint,
    RequestMetrics,
    status_class,
)
from tests.servers import bento_server

TOKEN = "tok-metrics-5e0c2b9a7d1f4e3c8b6a0f9e2d4c1b7a"
CHEST = "chest/siim_cr_jpegbaseline_mono2.dcm"
FLOOD = 25  # requests of each of the six kinds below, per flood: 150 in all (the example: 100)
ODD_METHODS = ("PROPFIND", "MKCOL", "PURGE")  # tokens a client may send; none may become a label value
SERIES_ADDED_BY_FIRST_FLOOD = 150  # a fixed set of label combinations (counter + histogram lines), not per path


# --------------------------------------------------------------------------------------------------------------
# Helpers


def call(base: str, method: str, path: str, token: str | None = None, body: bytes | None = None,
         content_type: str = "application/dicom") -> int:
    """The status of one request (http.client: any method token, the path sent as given)."""
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = content_type
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def scrape(base: str) -> str:
    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def series(text: str) -> set[str]:
    """Every sample's identity (name and labels, without its value): one per line of the page."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def value(text: str, name: str, **labels: str) -> float:
    """The sample of `name` with exactly these labels (0 where there is none)."""
    wanted = name + "{" + ",".join(f'{key}="{val}"' for key, val in sorted(labels.items())) + "}"
    for line in text.splitlines():
        key, _, number = line.rpartition(" ")
        if key and "{" in key and _canonical(key) == wanted:
            return float(number)
    return 0.0


def _canonical(key: str) -> str:
    name, _, labels = key.partition("{")
    pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def flood(base: str) -> list[str]:
    """Requests no route template should remember: random paths and study URLs (API and reading room), with and
    without a token, and a few non-standard methods. Returns the random parts (UIDs, path tokens) sent."""
    sent: list[str] = []
    for _ in range(FLOOD):
        word, uid, other_uid = secrets.token_hex(6), str(generate_uid()), str(generate_uid())
        sent += [word, uid, other_uid]
        assert call(base, "GET", f"/{word}/{uid}") == 401  # unauthenticated: auth answers first
        assert call(base, "GET", f"/v1/studies/{uid}") == 401
        assert call(base, "GET", f"/v1/{word}", TOKEN) == 404  # authenticated: nothing serves it
        assert call(base, "GET", f"/v1/studies/{other_uid}", TOKEN) == 404  # a study the worklist does not know
        assert call(base, "GET", f"/worklist/studies/{uid}") == 401  # the reading room: its gate answers first
        assert call(base, "GET", f"/worklist/studies/{other_uid}", TOKEN) < 500  # its study page
    for method in ODD_METHODS:
        assert call(base, method, "/v1/triage", TOKEN) in (400, 405)
    return sent


# --------------------------------------------------------------------------------------------------------------
# The real service


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> Iterator[str]:
    """`bentoml serve` with bearer auth on (health open, /metrics behind the token), one film triaged."""
    home = tmp_path_factory.mktemp("request-metrics")
    env = {"PTX_DATA_DIR": str(home / "data"), "PTX_API_TOKEN": TOKEN}
    with bento_server(home / "server.log", env=env, timeout_s=180) as base:
        assert call(base, "POST", "/v1/triage?mask=none", TOKEN, (realdata / CHEST).read_bytes()) == 200
        yield base


def test_a_flood_of_new_paths_and_study_uids_adds_no_series_and_no_uid(server: str) -> None:
    before = series(scrape(server))
    sent = flood(server)
    after_first = scrape(server)
    first = series(after_first)
    assert len(first - before) <= SERIES_ADDED_BY_FIRST_FLOOD, \
        f"the first flood of {6 * FLOOD} requests added {len(first - before)} series"

    sent += flood(server)  # new words, new UIDs, the same kinds of request
    text = scrape(server)
    added = series(text) - first
    assert not added, f"a second flood of new paths added {len(added)} series, e.g. {sorted(added)[:5]}"
    leaked = [part for part in sent if part in text]
    assert not leaked, f"{len(leaked)} path parts or UIDs sent appear in /metrics, e.g. {leaked[:3]}"

    # Counted by route template: the study route and page (404 for an unknown study), refusals before routing,
    # and unknown paths, each flood's requests in the same series.
    assert value(text, "ptx_http_requests_total", route="/v1/studies/{study_uid}", method="GET",
                 status="4xx") == 2 * FLOOD
    assert value(text, "ptx_http_requests_total", route="/v1/{path}", method="GET", status="4xx") == 2 * FLOOD
    assert value(text, "ptx_http_requests_total", route=OTHER, method="GET", status="4xx") == 4 * FLOOD
    assert value(text, "ptx_http_requests_total", route="/v1/triage", method=OTHER, status="4xx") \
        == 2 * len(ODD_METHODS)
    assert value(text, "ptx_http_requests_total", route="/worklist/{path}", method="GET", status="4xx") == 2 * FLOOD
    study_page = "/worklist/studies/{study_uid}"
    assert sum(value(text, "ptx_http_requests_total", route=study_page, method="GET", status=status)
               for status in ("2xx", "3xx", "4xx")) == 2 * FLOOD
    assert not any(f'method="{method}"' in text for method in ODD_METHODS)


def test_the_edge_exports_route_templates_and_the_worker_keeps_adaptive_batching(server: str) -> None:
    text = scrape(server)
    assert value(text, "ptx_http_requests_total", route="/v1/triage", method="POST", status="2xx") >= 1
    assert value(text, "ptx_http_request_seconds_count", route="/v1/triage", method="POST") >= 1
    assert value(text, "ptx_http_requests_total", route="/readyz", method="GET", status="2xx") >= 1  # start-up
    assert value(text, "ptx_http_requests_total", route="/metrics", method="GET", status="2xx") >= 1
    # BentoML's per-path request series are off on the edge; the model worker's (its fixed API paths) and its
    # adaptive-batching histogram stay.
    bentoml_edge = [line for line in text.splitlines()
                    if line.startswith("bentoml_service_request") and 'service_name="ptx-triage"' in line]
    assert not bentoml_edge, f"BentoML still counts the edge's requests by path: {bentoml_edge[:2]}"
    assert re.search(r'^bentoml_service_adaptive_batch_size_count\{[^}]*method_name="classify"', text, re.MULTILINE)
    assert re.search(r'^bentoml_service_request_total\{[^}]*service_name="ptx-models"', text, re.MULTILINE)


def test_metrics_stays_behind_the_token(server: str) -> None:
    assert call(server, "GET", "/metrics") == 401
    assert call(server, "GET", "/metrics", TOKEN) == 200


# --------------------------------------------------------------------------------------------------------------
# The middleware in an application built like BentoML's (no server)


@pytest.fixture(scope="module")
def client() -> Any:
    """A Starlette app shaped like BentoML's edge: plain routes, passive mounts of our two FastAPI apps,
    RequestMetrics outside auth and MetricsEndpoint inside it (the order service/app.py adds them in)."""
    from _bentoml_impl.server.mount import PassiveMount
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.http.auth import AuthConfig, BearerAuth
    from service.http.pages import pages
    from service.http.routes import http

    async def plain(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/readyz", plain), Route("/docs.json", plain), PassiveMount("/v1", http),
                            PassiveMount("/worklist", pages)],
                    middleware=[Middleware(RequestMetrics),
                                Middleware(BearerAuth, config=AuthConfig.from_tokens([TOKEN])),
                                Middleware(MetricsEndpoint)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's TestClient on httpx: a deprecation, not ours
        from starlette.testclient import TestClient

        return TestClient(app, raise_server_exceptions=False)


def counted(route: str, method: str, status: str) -> float:
    """This process's ptx_http_requests_total sample (no multiprocess directory in a test: the default registry)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ptx_http_requests_total", {"route": route, "method": method,
                                                                 "status": status}) or 0.0


@pytest.mark.parametrize(("method", "path", "token", "route"), [
    ("GET", "/v1/studies/1.2.826.0.1.3680043.8.498.1", True, "/v1/studies/{study_uid}"),  # no worklist here: 5xx
    ("POST", "/v1/studies/1.2.3/ack", True, "/v1/studies/{study_uid}/ack"),
    ("DELETE", "/v1/studies/1.2.3", True, "/v1/studies/{study_uid}"),  # 405: the route, not the path
    ("GET", "/v1/results/1.2/3.4/SEG.dcm", True, "/v1/results/{study_uid}/{sop_uid}/{name}"),
    ("GET", "/v1/studies/1.2.3", False, "/v1/{path}"),  # refused by auth before routing
    ("GET", "/worklist/studies/1.2.3", True, "/worklist/studies/{study_uid}"),  # the reading room: no store, 5xx
    ("GET", "/worklist/studies/1.2.3", False, "/worklist/{path}"),  # refused by its gate before routing
    ("GET", "/worklist/static/pages.css", False, "/worklist/{path}"),  # a file, not a route
    ("GET", "/v1/no-such-thing", True, OTHER),
    ("GET", "/no/such/thing", False, OTHER),
    ("GET", "/readyz", True, "/readyz"),
    ("GET", "/metrics", True, "/metrics"),
])
def test_each_request_is_counted_by_its_route_template(client: Any, method: str, path: str, token: bool,
                                                       route: str) -> None:
    before = {status: counted(route, method, status) for status in ("2xx", "4xx", "5xx")}
    answer = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"} if token else {})
    status = status_class(answer.status_code)
    assert counted(route, method, status) == before[status] + 1, (answer.status_code, answer.text[:200])


def test_metrics_endpoint_serves_the_page_only_with_a_token(client: Any) -> None:
    assert client.get("/metrics").status_code == 401
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE ptx_http_requests_total counter" in answer.text


def test_an_odd_method_is_counted_as_other(client: Any) -> None:
    before = counted("/v1/triage", OTHER, "4xx")
    assert client.request("PROPFIND", "/v1/triage", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405
    assert counted("/v1/triage", OTHER, "4xx") == before + 1


@pytest.mark.parametrize(("status", "label"), [(200, "2xx"), (307, "3xx"), (404, "4xx"), (503, "5xx"), (None, "5xx")])
def test_status_is_counted_by_class(status: int | None, label: str) -> None:
    assert status_class(status) == label
