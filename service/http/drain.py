"""A clean stop (issue 13 §10): on SIGTERM each edge worker drains before uvicorn's own shutdown begins.

What uvicorn does alone (measured with `bentoml serve`, tests/http/test_drain.py): on SIGTERM it stops
accepting at once -- new connections wait in the supervisor's socket until it exits and are reset -- and the
model worker, signalled at the same moment by the supervisor (circus), exits within a second, so an admitted
request still uploading its film was answered 503 `model_unavailable`.

What happens here instead, for up to PTX_DRAIN_TIMEOUT_S:
* the edge keeps accepting, answers every new request 503 `shutting_down` with Retry-After (a load balancer
  moves the client elsewhere; /readyz says 503 too) -- except /livez, /healthz and /metrics;
* requests already in progress run to their end, and so do films the DICOM intake had started (the
  cascade's admitted slots); an intake film not yet started waits in the spool for the next start;
* the model worker serves until the edge workers are gone (`outlast_edge`), and its Unix socket stays where the
  edge finds it until then (`supervisor_stops_workers_first`);
* then uvicorn's own handler runs: close, lifespan shutdown (the PACS side stops), exit. A request still
  running at the deadline is cancelled and answered 503 `shutting_down` if nothing was sent yet.
A second SIGTERM goes to uvicorn at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import psutil
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.cascade.served import shutting_down
from service.http.answers import error_answer

log = logging.getLogger("ptx.app")

OPEN_WHILE_DRAINING = ("/livez", "/healthz", "/metrics")  # probes of liveness and the last scrape
POLL_S = 0.1
BENTOML_WORKER = "_bentoml_impl.worker.service"  # the module every BentoML worker process runs


def chain_sigterm(begin: Callable[[], None]) -> Callable[[], None]:
    """Make SIGTERM call `begin` (on the event loop) instead of the handler in place (uvicorn's); returns a
    function that hands SIGTERM to that handler. A second SIGTERM goes straight to it."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    received = False

    def forward() -> None:
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:  # not under uvicorn (SIG_DFL): the default action
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        if received:
            forward()
            return
        received = True
        loop.call_soon_threadsafe(begin)

    signal.signal(signal.SIGTERM, on_sigterm)
    return forward


class Drain:
    """One edge worker's requests in progress, and its drain after SIGTERM."""

    def __init__(self, timeout_s: float, retry_after_s: int) -> None:
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.requests: set[asyncio.Task[Any]] = set()
        self.cut_short: set[asyncio.Task[Any]] = set()  # cancelled at the deadline
        self.draining = False

    @classmethod
    def under_bentoml(cls, timeout_s: float, retry_after_s: int) -> Drain:
        """The drain of a service run by `bentoml serve`: also makes its supervisor keep the model worker's
        socket until the workers have stopped (called at import, so in the supervisor process too)."""
        supervisor_stops_workers_first()
        return cls(timeout_s, retry_after_s)

    def install(self, films_in_progress: Callable[[], int], stop_admitting: Callable[[], None]) -> None:
        """From the worker's startup hook (main thread, event loop running): SIGTERM starts the drain."""
        def begin() -> None:
            self.draining = True
            stop_admitting()
            asyncio.get_running_loop().create_task(self.run(films_in_progress, forward), name="ptx-drain")

        forward = chain_sigterm(begin)

    async def run(self, films_in_progress: Callable[[], int], then: Callable[[], None]) -> None:
        """Wait for the requests and films in progress (or the deadline), then hand over to uvicorn."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        log.warning("SIGTERM: draining %d request(s) and %d film(s) for up to %.0f s (PTX_DRAIN_TIMEOUT_S); "
                    "new requests are answered 503", len(self.requests), films_in_progress(), self.timeout_s)
        while (self.requests or films_in_progress()) and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        if self.requests or films_in_progress():
            log.error("drain deadline: %d request(s) and %d film(s) still in progress are cut short",
                      len(self.requests), films_in_progress())
            for task in self.requests:
                self.cut_short.add(task)
                task.cancel()
        else:
            log.info("drained: nothing in progress; stopping")
        then()

    def refuses(self, scope: Scope) -> bool:
        return self.draining and scope.get("path", "") not in OPEN_WHILE_DRAINING


class DrainGate:
    """ASGI middleware: counts the requests in progress; while draining, answers new ones 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.refuses(scope):
            await self.refuse(scope, receive, send, close=True)
            return
        task = asyncio.current_task()
        assert task is not None
        sent = {"start": False, "end": False}

        async def watched_send(message: Message) -> None:
            sent["start"] = True
            await send(message)
            sent["end"] = message["type"] == "http.response.body" and not message.get("more_body", False)

        self.drain.requests.add(task)
        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if task not in self.drain.cut_short:
                raise
            task.uncancel()  # our own cancellation at the deadline: answer, then let uvicorn close
            if not sent["start"]:
                await self.refuse(scope, receive, send, close=False)
            elif not sent["end"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.drain.requests.discard(task)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, close: bool) -> None:
        """503 `shutting_down` with Retry-After; `close`: the client should not reuse this connection."""
        refusal = shutting_down(self.drain.retry_after_s)
        if close:
            refusal.headers["Connection"] = "close"
        await error_answer(refusal)(scope, receive, send)


def outlast_edge(timeout_s: float) -> None:
    """From the model worker's startup hook: on SIGTERM keep serving until no other BentoML worker of this
    server is left (the edge workers, draining), at most `timeout_s`; then hand over to uvicorn."""
    async def wait_for_edge() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        log.info("SIGTERM: the model worker serves until the edge workers have stopped (at most %.0f s)", timeout_s)
        while other_workers() and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        forward()

    def begin() -> None:
        asyncio.get_running_loop().create_task(wait_for_edge(), name="ptx-outlast-edge")

    forward = chain_sigterm(begin)


def other_workers() -> list[psutil.Process]:
    """The other live BentoML worker processes under this process's parent (the supervisor)."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.NoSuchProcess:
        return []
    alive = []
    for process in siblings:
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and BENTOML_WORKER in process.cmdline():
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def supervisor_stops_workers_first() -> None:
    """Make BentoML's supervisor stop its workers before it deletes their sockets' folder.

    BentoML 1.4.39's `Arbiter.stop` closes its exit stack -- which removes the `bentoml-uds-*` folder holding the
    model worker's Unix socket -- and only then has circus signal the workers. The model worker keeps serving the
    drain (`outlast_edge`), but an edge call that needs a new connection finds no socket file ("No such file or
    directory") and its admitted film was answered 503 `model_unavailable` (tests/http/test_drain.py: 2 runs in
    4 before this). The stack is closed instead when circus's loop has ended, after the workers are gone.
    Patching is the only hook: the order is inside BentoML (pinned exactly); a BentoML without this class is
    left alone. Idempotent (every process imports the service).
    """
    try:
        from bentoml._internal.utils.circus import Arbiter
        from circus.arbiter import Arbiter as CircusArbiter
    except ImportError:  # pragma: no cover -- another BentoML layout: nothing to reorder
        return
    if getattr(Arbiter, "_ptx_workers_first", False):
        return
    started = Arbiter.start

    def start(self: Any, cb: Callable[[Any], Any] | None = None) -> None:
        try:
            started(self, cb)  # blocks until circus's loop stops, i.e. after every watcher has stopped
        finally:
            self.exit_stack.__exit__(None, None, None)  # now the sockets' folder may go

    def stop(self: Any) -> Any:
        return CircusArbiter.stop(self)  # the watchers first; `start` closes the stack when they are gone

    Arbiter.start, Arbiter.stop = start, stop
    Arbiter._ptx_workers_first = True
