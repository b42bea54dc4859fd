"""The reading room's pages (issue 14): placeholder app, replaced by the worklist-page work."""

from __future__ import annotations

from fastapi import FastAPI

pages = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
