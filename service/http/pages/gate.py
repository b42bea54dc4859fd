"""The pages' door: who may see /worklist/*, and the sign-in that turns a token into a session cookie.

`auth.BearerAuth` hands every request under /worklist to `PageGate` (the API keeps its bearer-only rule).
The gate decides, in this order:

1. a POST, PUT, PATCH or DELETE whose Origin (or Referer) is not this host: 403 `cross_origin`, whatever
   else it carries (this also covers a reverse proxy that injects the token into every request);
2. no token configured: the pages are open exactly as the API is, and nobody signs in;
3. POST /worklist/login: the token from the form checked like a bearer token; accepted, a session cookie
   and a redirect; refused, the form again (401) with a message that never repeats the token;
4. /worklist/login and /worklist/static/*: open (the form and its stylesheet);
5. otherwise a bearer token or a session cookie, else a redirect to the sign-in form (a browser asking for
   a page) or 401 (a script, a fragment, the event stream); a read-only role may not POST (403).

The reader (`session.Reader`) goes to the pages in `scope["ptx.reader"]`, with `scope["ptx.auth_on"]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import parse_qs, quote

from service.http.pages import session
from service.http.pages.session import Reader, Role

log = logging.getLogger("ptx.auth")

PREFIX = session.COOKIE_PATH
LOGIN, LOGOUT, STATIC = f"{PREFIX}/login", f"{PREFIX}/logout", f"{PREFIX}/static/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM_BYTES = 8 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Credentials(Protocol):
    """What the gate needs of the token configuration (`auth.AuthConfig`)."""

    @property
    def session_keys(self) -> tuple[bytes, ...]: ...

    def sign_in(self, presented: str) -> tuple[Role, bytes] | None: ...

    def role_of(self, presented: str) -> Role | None: ...


def is_page_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


async def answer(send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """The API's error shape, for refusals a person's browser should not normally meet."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def redirect(send: Send, location: str, cookie: bytes | None = None) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0"), (b"cache-control", b"no-store")]
    if cookie is not None:
        headers.append((b"set-cookie", cookie))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def read_form(receive: Receive) -> dict[str, str] | None:
    """An urlencoded form of at most MAX_FORM_BYTES (None when larger): first value of each field."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return {}
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    fields = parse_qs(b"".join(chunks).decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
    return {name: values[0] for name, values in fields.items()}


def replay(form: dict[str, str]) -> Receive:
    """A `receive` that hands the app the form again (the gate has read the body)."""
    body = "&".join(f"{quote(k)}={quote(v)}" for k, v in form.items()).encode()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class PageGate:
    """Pure ASGI: sign-in, sessions and the page rules above, in front of the pages app."""

    def __init__(self, app: App, credentials: Credentials | None) -> None:
        self.app, self.credentials = app, credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the pages use none
            await send({"type": "websocket.close", "code": 1008})
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        secure = session.is_https(scope)
        if method not in SAFE_METHODS and not session.same_origin(scope):
            await answer(send, 403, "cross_origin", "a form of these pages must be sent from these pages (the "
                                                    "Origin or Referer header names another site, or none)")
            return
        if path == LOGOUT and method == "POST":
            await redirect(send, LOGIN, session.clear_cookie(secure))
            return
        if self.credentials is None:
            await self.app({**scope, "ptx.reader": None, "ptx.auth_on": False}, receive, send)
            return
        if path == LOGIN and method == "POST":
            await self._sign_in(scope, receive, send, self.credentials, secure)
            return
        if path == LOGIN or path.startswith(STATIC):
            await self.app({**scope, "ptx.reader": None, "ptx.auth_on": True}, receive, send)
            return
        reader = self._reader(scope, self.credentials)
        if reader is None:
            await self._refuse(scope, send, method, path)
            return
        if method not in SAFE_METHODS and not reader.may_review:
            await answer(send, 403, "read_only", "this token's role is read-only: it may look, not change")
            return
        await self.app({**scope, "ptx.reader": reader, "ptx.auth_on": True}, receive, send)

    @staticmethod
    def _reader(scope: Scope, credentials: Credentials) -> Reader | None:
        token = session.bearer_token(scope.get("headers", ()))
        if token is not None:
            role = credentials.role_of(token)
            return None if role is None else Reader(None, role)
        cookie = session.cookie_value(scope)
        return None if cookie is None else session.verify(cookie, credentials.session_keys)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, method: str, path: str) -> None:
        headers = session.headers_of(scope)
        wants_page = method == "GET" and "text/html" in headers.get("accept", "") and "hx-request" not in headers
        if wants_page:
            query = scope.get("query_string", b"").decode("latin-1")
            here = path + (f"?{query}" if query else "")
            await redirect(send, f"{LOGIN}?next={quote(session.safe_next(here), safe='')}")
            return
        await answer(send, 401, "unauthorized", "sign in at /worklist/login (or send Authorization: Bearer <token>)",
                     [(b"www-authenticate", b'Bearer realm="ptx-triage"')])

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send, credentials: Credentials,
                       secure: bool) -> None:
        form = await read_form(receive)
        if form is None:
            await answer(send, 413, "too_large", f"the sign-in form is limited to {MAX_FORM_BYTES} bytes")
            return
        error, status = None, 401
        signed = credentials.sign_in(form.get("token", "").strip())
        try:
            login = session.check_login(form.get("reader", ""))
        except ValueError as exc:
            login, error, status = "", str(exc), 400
        if signed is None:
            error, status = "that token is not accepted: check it with whoever runs the service", 401
            log.warning("sign-in refused: the token is not accepted")
        if error is not None or signed is None:
            failed = {"reader": login or form.get("reader", "")[:session.MAX_READER], "next": form.get("next", "")}
            await self.app({**scope, "ptx.reader": None, "ptx.auth_on": True, "ptx.sign_in_error": (status, error)},
                           replay(failed), send)
            return
        role, key = signed
        log.info("reader %s signed in (role %s)", login, role.value)
        await redirect(send, session.safe_next(form.get("next")), session.set_cookie(
            session.issue(key, login, role), secure))
