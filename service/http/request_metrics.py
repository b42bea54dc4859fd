"""HTTP request metrics by route template (issue 13 §6): placeholder, replaced by the metrics helper."""

from __future__ import annotations

from typing import Any


class RequestMetrics:
    """Pass-through ASGI middleware until the route-template counting lands."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
