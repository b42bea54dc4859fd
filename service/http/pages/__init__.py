"""The reading room's pages (issue 14): the worklist for people, mounted by service/app.py at /worklist.

    gate.py        who may come in: sign-in, session cookie, CSRF, roles (auth.BearerAuth hands /worklist over)
    session.py     the signed session cookie and the CSRF rules (pure)
    views.py       the routes: worklist, rows, events, study, files, sign-in form
    rows.py        what a row shows, from the store's records (pure)
    live.py        server-sent events: one poller per process, bounded streams, ended on shutdown
    verdicts.py    readers' verdicts (agree / disagree / uncertain): parsed, counted, exported (the API's too)
    viewer.py      PTX_VIEWER_URL: a study's link into the site's viewer
    thumbnails.py  small overlays for the list
    front.py       the text of the service's front page (`/`)
    templates/     Jinja2, one per page; static/ beside them (htmx, vendored with its licence; our CSS and JS)

Server-rendered HTML that works without JavaScript (filters and paging are links and forms); a little script
adds the live rows and the STAT cue. docs/reading-room.md tells a site how to use and configure it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from service.http.pages import live
from service.http.pages.views import router


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    live.HUB.close()  # BentoML runs a mounted app's lifespan; the signal hook has usually ended them already


pages = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=_lifespan)
pages.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")
pages.include_router(router)

__all__ = ["pages"]
