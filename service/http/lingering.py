"""Early answers the client can read: an answer sent before the request body was read (401, 413, 503) is
followed by reading and discarding the rest of the body, up to a bound, before the connection may close.

Why: most clients (Python's http.client and urllib, many upload tools) send the whole body before they
read anything. When a server closes a connection with unread data in its receive buffer, the kernel sends a
reset instead of a clean close, and the reset destroys the answer the client had not read yet: the client
sees a broken pipe or "connection reset", not the 413 that says why (issue 13 §7). uvicorn closes after the
answer when the client asked for `Connection: close` (urllib always does) or during a shutdown. This is the
ASGI form of a lingering close: the answer (headers and body) is sent at once, then the rest of the request
body is received and dropped -- at most `limit` bytes, never kept -- and only then is the answer completed.

Bounds: a body whose declared rest exceeds `limit` is not read (the connection closes; a client that reads
while it sends, like curl, still sees the answer); a client that sends nothing for `idle_s` is given up on.
A client that waits for `100 Continue` before sending its body is never invited to send it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class BodyProgress:
    """How much of the request body the application has received."""

    declared: int | None  # Content-Length; None for a chunked body
    expects_continue: bool  # `Expect: 100-continue`: the client waits for the first receive() to send
    received: int = 0
    complete: bool = False
    asked: bool = False  # the application called receive() at least once

    def note(self, message: Message) -> None:
        self.asked = True
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:  # http.disconnect: nothing more will come
            self.complete = True

    def rest(self) -> int | None:
        """Bytes still to come when declared; None when unknown (chunked)."""
        return None if self.declared is None else max(self.declared - self.received, 0)


def progress_of(scope: Scope) -> BodyProgress:
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    length = headers.get(b"content-length", b"")
    declared = int(length) if length.isdigit() else None
    chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
    progress = BodyProgress(None if chunked else declared, headers.get(b"expect", b"").lower() == b"100-continue")
    progress.complete = not chunked and not declared  # neither length nor chunks: HTTP/1.1 says no body
    return progress


class LingeringClose:
    """ASGI middleware: an answer that leaves the request body unread drains it (bounded) before it ends."""

    def __init__(self, app: ASGIApp, limit: int, idle_s: float = 5.0) -> None:
        self.app, self.limit, self.idle_s = app, limit, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = progress_of(scope)
        drain_after = False

        async def tracked_receive() -> Message:
            message = await receive()
            body.note(message)
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal drain_after
            if message["type"] == "http.response.start" and not body.complete:
                drain_after, close = self.plan(body)
                if close:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and drain_after and not message.get("more_body"):
                drain_after = False  # once: an end sent after a cancelled drain goes straight out
                if message.get("body"):
                    await send({**message, "more_body": True})  # the whole answer goes out now
                await self.drain(receive, body)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)

    def plan(self, body: BodyProgress) -> tuple[bool, bool]:
        """(drain the rest?, close the connection after the answer?) for an answer that starts early."""
        if body.expects_continue and not body.asked:
            return False, True  # the body was never asked for: do not invite it, do not wait for it
        rest = body.rest()
        if rest is None:
            return True, True  # chunked: read what comes, up to the limit, then close
        if rest > self.limit:
            return False, True
        return True, False  # drained in full, the connection stays usable (if the client keeps it)

    async def drain(self, receive: Receive, body: BodyProgress) -> None:
        """Receive and drop the rest of the body: at most `limit` bytes, giving up after `idle_s` of silence."""
        start = body.received
        while not body.complete and body.received - start <= self.limit:
            try:
                body.note(await asyncio.wait_for(receive(), self.idle_s))
            except TimeoutError:
                return
