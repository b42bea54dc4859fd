"""HTTP request metrics by route template, and the edge's /metrics page (issue 13 §6).

Why not BentoML's: its request metrics label every series with the raw URL path, so each random path a client
tries and each study viewed (`/v1/studies/<Study Instance UID>`) adds series for good: unbounded memory and
scrape size, and UIDs in `/metrics`. The edge turns them off (`metrics={"enabled": False}` on the Triage
service, service/app.py), which also drops BentoML's /metrics route there, so `MetricsEndpoint` serves the
same multiprocess page. The model worker keeps BentoML's metrics: its adaptive-batching histogram is there,
and only the edge calls it, on its fixed API paths.

Two middlewares, because they must sit at two places: `RequestMetrics` first (outermost), to count every
answer, refusals by the drain and by auth included; `MetricsEndpoint` after auth, so that /metrics keeps its
token, and where it sees the scope the router fills in (it notes the route that served the request).

`RequestMetrics` counts `ptx_http_requests_total{route, method, status}` and observes
`ptx_http_request_seconds{route, method}`, where each label comes from a bounded set:

* route: the template of the route that served the request, its mount included (`/v1/studies/{study_uid}`),
  BentoML's own endpoints by their path (`/readyz`, `/docs.json`, `/metrics` ...), `<mount>/{path}` for a
  request refused inside a mount before routing (401), and `other` for paths nothing serves (404s);
* method: the standard methods, and `other` for any other token a client sends;
* status: the class, `2xx` ... `5xx`; an application that fails before answering counts as `5xx` (Starlette's
  error middleware, or BentoML's request timeout, answers 500 / 504 around us).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.routing import Match, Mount

from service.metrics import child, metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OTHER = "other"  # the one label value for paths no route serves, and for non-standard methods
EXPOSITION_PATH = "/metrics"  # served by MetricsEndpoint, not by a route of the application
ROUTE_NOTE = "ptx.route_note"  # scope key: a dict MetricsEndpoint fills with the route that served the request
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def top_route(scope: Scope) -> tuple[Any | None, str]:
    """The application's top-level route for a request, matched on arrival the way Starlette's router does
    (a full match first, else the first partial one: a method mismatch, answered 405), and the root path it
    gives the routes below it (a mount's prefix); (None, "") where no route matches.

    `scope["app"]` is the Starlette application around this middleware (set before its middleware runs); its
    top level is BentoML's: plain routes (/readyz, /docs.json ...) and mounts (/v1, /worklist)."""
    partial: tuple[Any | None, str] = (None, "")
    for route in getattr(scope.get("app"), "routes", ()):
        match, child_scope = route.matches(scope)
        if match is Match.NONE:
            continue
        found = (route, str(child_scope.get("root_path", scope.get("root_path", ""))))
        if match is Match.FULL:
            return found
        if partial[0] is None:
            partial = found
    return partial


def label_route(scope: Scope, top: Any | None, below_root: str) -> str:
    """The route label, once the application has run: the top-level route's path, and for a mount the path of
    the route inside it that served the request (the router leaves it in `scope["route"]`, which MetricsEndpoint
    notes: a middleware between may hand on a copy of the scope, as the pages' gate does). Only `path` strings
    written in the code are joined, never the request's path.

    The inner route counts only if its pattern matches the path below the mount (`below_root`, the mount's
    prefix): a route of a router included with a prefix keeps its own path in FastAPI, and a route deeper than
    one level sits below another prefix, so those, like requests refused before routing (auth), are labelled
    `<mount>/{path}`."""
    path = getattr(top, "path", None)
    if not isinstance(path, str):
        return EXPOSITION_PATH if scope.get("path") == EXPOSITION_PATH else OTHER
    if not isinstance(top, Mount):
        return path
    inner = scope.get(ROUTE_NOTE, {}).get("route", scope.get("route"))
    inner_path, pattern = getattr(inner, "path", None), getattr(inner, "path_regex", None)
    requested = scope.get("path", "")
    below = requested.removeprefix(below_root)
    if inner is not top and isinstance(inner_path, str) and pattern is not None and pattern.fullmatch(below):
        return path + inner_path
    return path + "/{path}"


def status_class(status: int | None) -> str:
    """`2xx` ... `5xx`; no answer at all (the application raised, or was cancelled) counts as `5xx`."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "5xx"


class RequestMetrics:
    """ASGI middleware: one count and one latency observation per HTTP request, by route template.

    The scope it hands on is a copy with an empty `ROUTE_NOTE` (middlewares copy scopes rather than change them);
    copies made further in keep the same note, so MetricsEndpoint's entry reaches the label."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan, websockets
            return
        top, below_root = top_route(scope)
        method = scope.get("method", "")
        method = method if method in METHODS else OTHER
        status: int | None = None

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        scope = {**scope, ROUTE_NOTE: {}}
        try:
            await self.app(scope, receive, noting_status)
        finally:
            family, route = metrics(), label_route(scope, top, below_root)
            child(family.http_requests, route=route, method=method, status=status_class(status)).inc()
            child(family.http_seconds, route=route, method=method).observe(time.perf_counter() - started)


def exposition() -> bytes:
    """The Prometheus text page of every process of the server: the multiprocess directory BentoML sets up
    (the model worker's series included), or this process's registry where there is none (a test in-process).

    prometheus_client is imported here, not at module import: it decides at import whether to write
    multiprocess files, and BentoML sets PROMETHEUS_MULTIPROC_DIR only after importing the service module."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


class MetricsEndpoint:
    """ASGI middleware answering GET/HEAD `/metrics` with `exposition()`; every other request passes through,
    and the route that served it is noted for RequestMetrics (`ROUTE_NOTE`).

    Added after auth (inside it), so `/metrics` needs a token unless PTX_AUTH_OPEN_METRICS, as BentoML's page did,
    and so it sees the scope the router fills in. The page is built in a thread: reading every process's files
    is blocking work."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = scope["type"] == "http" and scope.get("path") == EXPOSITION_PATH
        if not asked or scope.get("method") not in ("GET", "HEAD"):
            try:
                await self.app(scope, receive, send)
            finally:
                note = scope.get(ROUTE_NOTE)
                if isinstance(note, dict) and "route" in scope:
                    note["route"] = scope["route"]
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await asyncio.to_thread(exposition)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
