"""Live worklist: server-sent events that tell an open page its rows changed (issue 14 §1).

    page ──GET /worklist/events?<its filters>&v=<version it shows>──▶ LiveHub.stream
    LiveHub: every POLL_S, per distinct view: the store's page query → version; changed → "change" event
             once per poll: the unreviewed STAT studies; a UID not seen before → in the event's "stat" list
    page: on "change" it fetches its rows again (htmx) and cues the new STATs (banner, optional sound)

Nearly free while nothing changes: each poll first reads the store's change token (`latest_change`: the
studies' count and newest `updated_at`, two index lookups) and runs the page queries only when it moved,
when a page joined, or every FULL_EVERY_S anyway (a "last hour" view loses rows as time passes, and a write
stamped by a clock behind the newest one need not move the token).

Why polling the store and not a signal from the writer: the study is written by whichever process ran the
intake (the PACS side runs in one edge worker, HTTP triage in any), possibly on another host's PostgreSQL
connection; the database is the one place every writer meets, and SQLite and PostgreSQL answer the same
query. Each process polls once per distinct view, not once per open page, and only while a page is open.

Bounded and ending: at most MAX_STREAMS streams per process (beyond: 503, the page retries); a comment line
every HEARTBEAT_S keeps proxies from closing an idle stream; a stream ends after MAX_STREAM_S (the browser
reconnects at once, re-checking the session) and on shutdown. Why a signal hook for shutdown: uvicorn waits
for open responses to finish *before* it runs the lifespan's shutdown, so an endless stream would hold a
SIGTERM'd worker until it is killed; the hook ends the streams when the signal arrives, then hands the
signal on to uvicorn's own handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from service.log_safety import describe_exception

log = logging.getLogger("ptx.pages")

POLL_S = 0.5  # a change reaches an open page within about this plus one fetch (goal: 1 s)
FULL_EVERY_S = 10.0  # the page queries run at least this often, whatever the change token says
HEARTBEAT_S = 15.0
MAX_STREAMS = 32
MAX_STREAM_S = 300.0
MAX_STAT_UIDS = 20  # in one event; more new STATs at once still cue, the rows show them all
RETRY_MS = 1000

Version = Callable[[Any], Awaitable[str]]
StatSet = Callable[[], Awaitable[frozenset[str]]]
Token = Callable[[], Awaitable[str]]


class Busy(Exception):
    """MAX_STREAMS streams are open in this process."""


@dataclass(eq=False)
class _Stream:
    view: Hashable
    version: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(maxsize=4))


def sse(event: str | None, data: dict[str, Any] | None = None, comment: str | None = None) -> bytes:
    """One server-sent event (or a comment line) in the wire format."""
    if comment is not None:
        return f": {comment}\n\n".encode()
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LiveHub:
    """The streams of one process and the poller that feeds them."""

    def __init__(self, poll_s: float = POLL_S, max_streams: int = MAX_STREAMS, heartbeat_s: float = HEARTBEAT_S,
                 max_stream_s: float = MAX_STREAM_S, full_every_s: float = FULL_EVERY_S) -> None:
        self.poll_s, self.max_streams = poll_s, max_streams
        self.heartbeat_s, self.max_stream_s, self.full_every_s = heartbeat_s, max_stream_s, full_every_s
        self._streams: set[_Stream] = set()
        self._poller: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._version: Version | None = None
        self._stat: StatSet | None = None
        self._changed: Token | None = None
        self._token: str | None = None  # the change token of the last full poll (None: compare in full next)
        self._full_due = 0.0  # loop time of the next full poll whatever the token says
        self._joined = 0  # streams opened so far: a poll records its token only if none joined while it ran
        self._known_stat: frozenset[str] | None = None
        self._signals_hooked = False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream(self, view: Hashable, shown: str, version: Version, stat: StatSet,
               changed: Token | None = None) -> AsyncIterator[bytes]:
        """Events for one page showing `view` at version `shown`; `changed` is the store's change token (None:
        every poll compares in full). Raises Busy before yielding anything."""
        if len(self._streams) >= self.max_streams:
            raise Busy(f"{self.max_streams} live pages are open in this worker")
        self._ensure_running(version, stat)
        self._changed = changed
        assert self._closing is not None
        entry = _Stream(view, shown)
        self._streams.add(entry)
        self._token, self._joined = None, self._joined + 1  # its page may predate the last poll: compare in full
        return self._events(entry, self._closing)

    async def _events(self, entry: _Stream, closing: asyncio.Event) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + self.max_stream_s
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            while not closing.is_set():
                left = ends_at - loop.time()
                if left <= 0:
                    break
                getter = asyncio.ensure_future(entry.queue.get())
                stopper = asyncio.ensure_future(closing.wait())
                done, _ = await asyncio.wait({getter, stopper}, timeout=min(self.heartbeat_s, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in (getter, stopper):
                    if task not in done:
                        task.cancel()
                if getter in done:
                    yield sse("change", getter.result())
                elif not done:
                    yield sse(None, comment="keep-alive")
        finally:
            self._streams.discard(entry)

    def _ensure_running(self, version: Version, stat: StatSet) -> None:
        self._version, self._stat = version, stat
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first stream, or a new loop (tests): start over on this one
            self._loop, self._closing, self._poller, self._known_stat = loop, asyncio.Event(), None, None
        if self._poller is None or self._poller.done():
            self._known_stat = self._token = None  # STATs that came while no page was open are on the page it loads
            self._poller = loop.create_task(self._poll(), name="ptx-live-poller")
        self._hook_signals(loop)

    async def _poll(self) -> None:
        """While streams are open: one store query per distinct view and one for the STATs, every poll_s."""
        assert self._closing is not None
        while self._streams and not self._closing.is_set():
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 -- a store hiccup must not end live updates for good
                log.warning("live worklist poll failed: %s", describe_exception(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.poll_s)

    async def poll_once(self) -> None:
        """Compare every open view with the store once; queue an event where it changed or a STAT is new."""
        if self._version is None or self._stat is None:
            return
        token, now, joined = None, asyncio.get_running_loop().time(), self._joined
        if self._changed is not None:
            token = await self._changed()
            if token == self._token and now < self._full_due:
                return  # nothing written since the last full poll
        views = {entry.view for entry in self._streams}
        versions = dict(zip(views, await asyncio.gather(*(self._version(view) for view in views)), strict=True))
        stat_now = await self._stat()
        if self._joined == joined:  # no page joined meanwhile (its view may not be among those compared)
            self._token, self._full_due = token, now + self.full_every_s
        new_stat = sorted(stat_now - self._known_stat) if self._known_stat is not None else []
        self._known_stat = stat_now
        for entry in list(self._streams):
            current = versions.get(entry.view, entry.version)
            if current == entry.version and not new_stat:
                continue
            entry.version = current
            event = {"version": current, "stat": new_stat[:MAX_STAT_UIDS], "stat_count": len(new_stat)}
            if entry.queue.full():  # a page that does not read: keep the newest state, drop the oldest
                entry.queue.get_nowait()
            entry.queue.put_nowait(event)

    def close(self) -> None:
        """End every stream now (shutdown); safe from a signal handler or another thread."""
        loop, closing = self._loop, self._closing
        if loop is None or closing is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(closing.set)

    def _hook_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """Chain SIGTERM/SIGINT: close the streams, then call the handler that was there (uvicorn's)."""
        if self._signals_hooked or threading.current_thread() is not threading.main_thread():
            return
        self._signals_hooked = True
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)

            def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
                self.close()
                if callable(previous):
                    previous(sig, frame)
                elif previous == signal.SIG_DFL:
                    signal.signal(sig, signal.SIG_DFL)
                    signal.raise_signal(sig)

            signal.signal(number, handler)


HUB = LiveHub()  # one per process: the pages of every request in this worker share its poller
