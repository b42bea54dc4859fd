"""The worklist API's own router on a real store, the running edge stubbed with it: for tests about how store
outcomes become answers (test_api_worklist, test_feedback, tests/pacs/test_outputs_pending). The real service
runs the same router behind `bentoml serve` (tests/http/test_api_worklist.py's server tests)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from service.http import worklist as api_worklist
from service.settings import Settings
from service.store import ResultsStore
from service.store.results_files import ResultsFolder


def router_client(monkeypatch: pytest.MonkeyPatch, store: ResultsStore, results: ResultsFolder,
                  settings: Settings | None = None) -> TestClient:
    """A client of /v1's worklist routes answering from `store` and `results` (the edge's settings: defaults)."""

    async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    monkeypatch.setattr(api_worklist, "_service", lambda: types.SimpleNamespace(
        store=store, in_thread=in_thread, results=results, settings=settings or Settings()))
    app = FastAPI()
    app.include_router(api_worklist.router, prefix="/v1")
    return TestClient(app)
