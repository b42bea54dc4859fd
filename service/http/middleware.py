"""The edge's ASGI middleware, in their one order (first added = outermost): why each sits where it does.

    RequestMetrics ─▶ LingeringClose ─▶ DrainGate ─▶ BearerAuth ─▶ MetricsEndpoint ─▶ the routes

* `RequestMetrics` outermost: every answer is counted by route template, refusals by the layers below included.
* `LingeringClose` next: an early answer (413, 401, 503) stays readable while the rest of the body is drained.
* `DrainGate` before auth: after SIGTERM new work gets 503 `shutting_down` whoever asks (probes still answer).
* `BearerAuth` before `/metrics`: our metrics endpoint is behind the token (BentoML's is off on the edge).
"""

from __future__ import annotations

from typing import Any

from service.http import auth, drain, lingering
from service.http.request_metrics import MetricsEndpoint, RequestMetrics


def install(service: Any, max_file_bytes: int, drain_state: drain.Drain, auth_config: auth.AuthConfig | None) -> None:
    """Add the middleware to a BentoML service class (`service.app.Triage`)."""
    service.add_asgi_middleware(RequestMetrics)
    service.add_asgi_middleware(lingering.LingeringClose, limit=2 * max_file_bytes)
    service.add_asgi_middleware(drain.DrainGate, drain=drain_state)
    service.add_asgi_middleware(auth.BearerAuth, config=auth_config)
    service.add_asgi_middleware(MetricsEndpoint)


__all__ = ["install"]
