"""Bearer-token authentication for everything the HTTP edge serves, BentoML's own endpoints included.

    request ─▶ [BentoML: metrics, tracing, access log] ─▶ BearerAuth ─▶ /v1/* (our FastAPI app),
                                                                       /metrics, /readyz, /docs.json ...

Why an ASGI middleware on the service and not a FastAPI dependency: /metrics, /healthz, /livez, /readyz and
the OpenAPI page are served by BentoML's Starlette app, outside our FastAPI app (mounted at /v1), so only a
middleware around the whole app (`Triage.add_asgi_middleware`) sees every request. It is deny by default:
every path is protected except the few named open ones (health probes, metrics, the API documentation, each
switchable). The model worker (`Models`) gets no middleware: it is reached only by the edge, over a socket
BentoML creates on the loopback interface, and its client sends no token.

Tokens come from `PTX_API_TOKEN` or `PTX_API_TOKEN_FILE` (one token per line: two lines let a client move
to a new token before the old one is removed). Comparison is constant-time in the token: both sides are
hashed with SHA-256 and the digests compared with `hmac.compare_digest` against every configured token, so
neither the content nor the length of a configured token shows in the response time. A token is never
logged, never put in an error message and never part of the settings' repr (`SecretStr`).

People sign in instead (issue 14 §4): everything under /worklist goes to `pages.gate.PageGate`, which turns
a token typed into the sign-in form into a session cookie (`pages/session.py`). A line of the token file
may give its token a role, `<token> role=read-only` (GET only, API and pages) or `role=reviewer` (the
default: everything); PTX_API_TOKEN's one token is a reviewer's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from service.errors import ServiceError
from service.http.pages.front import front_html, front_page
from service.http.pages.gate import SAFE_METHODS, PageGate, is_page_path
from service.http.pages.session import Role, bearer_token, session_key

log = logging.getLogger("ptx.auth")

MIN_TOKEN_LENGTH = 16
HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
METRICS_PATHS = frozenset({"/metrics"})
# BentoML's documentation: the page, the spec it loads, its static assets, and BentoML's schema view.
DOCS_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
DOCS_PREFIXES = ("/static_content/", "/assets/")
SCHEME_NAME = "bearerAuth"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenError(ServiceError, ValueError):
    """A token setting that cannot be used; the message names the setting, never the token."""

    code = "invalid_token_setting"


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def check_token(token: str, where: str) -> str:
    """A token as configured, or TokenError: empty, too short, or with whitespace or non-ASCII inside."""
    if not token:
        raise TokenError(f"{where} is empty: an empty token would let anyone in; unset it to switch auth off")
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"{where} holds a token of {len(token)} characters; at least {MIN_TOKEN_LENGTH} are "
                         "needed (e.g. `openssl rand -hex 32`)")
    if not token.isascii() or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise TokenError(f"{where} holds a token with whitespace, control or non-ASCII characters")
    return token


def read_token_file(path: Path) -> list[str]:
    """The tokens of a token file, without their roles (`read_token_entries`)."""
    return [token for token, _ in read_token_entries(path)]


def token_entry(line: str, where: str) -> tuple[str, Role]:
    """`<token>` or `<token> role=reviewer|read-only` (one line of the token file), checked."""
    token, *options = line.split()
    role = Role.REVIEWER
    for option in options:
        name, _, value = option.partition("=")
        if name != "role":
            raise TokenError(f"{where}: unknown text after the token (not shown: it may be part of a token); "
                             "only role=reviewer or role=read-only may follow it")
        try:
            role = Role(value)
        except ValueError:
            raise TokenError(f"{where}: role must be reviewer or read-only, got {value!r}") from None
    return check_token(token, where), role


def read_token_entries(path: Path) -> list[tuple[str, Role]]:
    """Tokens and roles from a file, one per line; blank lines and `#` comments ignored, surrounding whitespace
    (the trailing newline) stripped. A file that group or others can read is used with a warning rather than
    refused: Kubernetes mounts secrets 0644 by default, and the container's user is then the only one."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"PTX_API_TOKEN_FILE {path} cannot be read ({type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise TokenError(f"PTX_API_TOKEN_FILE {path} is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("PTX_API_TOKEN_FILE %s is accessible to group or others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [token for token in tokens if token and not token.startswith("#")]
    if not tokens:
        raise TokenError(f"PTX_API_TOKEN_FILE {path} holds no token")
    return [token_entry(token, f"PTX_API_TOKEN_FILE {path} (line {i + 1} of its tokens)")
            for i, token in enumerate(tokens)]


@dataclass(frozen=True)
class AuthConfig:
    """Who may call: the digests of the accepted tokens and which path groups stay open."""

    digests: tuple[bytes, ...]
    open_health: bool = True
    open_metrics: bool = False
    open_docs: bool = True
    roles: tuple[Role, ...] = ()  # one per digest; empty: every token a reviewer's

    def __repr__(self) -> str:  # the digests are not the tokens, but there is no reason to print them either
        read_only = sum(role is Role.READ_ONLY for role in self.roles)
        return (f"AuthConfig({len(self.digests)} token(s), {read_only} read-only, open_health={self.open_health}, "
                f"open_metrics={self.open_metrics}, open_docs={self.open_docs})")

    @classmethod
    def from_tokens(cls, tokens: Iterable[str | tuple[str, Role]], **options: bool) -> AuthConfig:
        entries = [(token, Role.REVIEWER) if isinstance(token, str) else token for token in tokens]
        digests = tuple(_digest(check_token(token, "a token").encode("ascii")) for token, _ in entries)
        if not digests:
            raise TokenError("no token given")
        return cls(digests, roles=tuple(role for _, role in entries), **options)  # type: ignore[arg-type]

    def _match(self, presented: str) -> int | None:
        """Constant-time in the configured tokens: every digest is compared, whichever matches."""
        digest = _digest(presented.encode("utf-8", "surrogatepass"))
        found = None
        for index, expected in enumerate(self.digests):
            if hmac.compare_digest(digest, expected):
                found = index
        return found

    def accepts(self, presented: str) -> bool:
        return self._match(presented) is not None

    def role_of(self, presented: str) -> Role | None:
        """The role of an accepted token, None for any other."""
        index = self._match(presented)
        return None if index is None else (self.roles[index] if self.roles else Role.REVIEWER)

    def sign_in(self, presented: str) -> tuple[Role, bytes] | None:
        """An accepted token's role and the key that signs the sessions opened with it (pages/session.py)."""
        index = self._match(presented)
        if index is None:
            return None
        return (self.roles[index] if self.roles else Role.REVIEWER), self.session_keys[index]

    @cached_property
    def session_keys(self) -> tuple[bytes, ...]:
        return tuple(session_key(digest) for digest in self.digests)

    def is_open(self, path: str) -> bool:
        """Paths served without a token. Exact matches (no prefix tricks: `/metrics/../v1` is not `/metrics`)."""
        if self.open_health and path in HEALTH_PATHS:
            return True
        if self.open_metrics and path in METRICS_PATHS:
            return True
        return self.open_docs and (path in DOCS_PATHS or path.startswith(DOCS_PREFIXES))


def from_settings(settings: Any) -> AuthConfig | None:
    """The configuration for `Settings`, or None when no token is set (authentication off)."""
    secret = settings.api_token.get_secret_value() if settings.api_token is not None else None
    if secret is not None and settings.api_token_file is not None:
        raise TokenError("set PTX_API_TOKEN or PTX_API_TOKEN_FILE, not both")
    if secret is not None:
        tokens = [(check_token(secret.strip(), "PTX_API_TOKEN"), Role.REVIEWER)]
    elif settings.api_token_file is not None:
        tokens = read_token_entries(Path(settings.api_token_file))
    else:
        return None
    return AuthConfig.from_tokens(tokens, open_health=settings.auth_open_health,
                                  open_metrics=settings.auth_open_metrics, open_docs=settings.auth_open_docs)


def _challenge(error: str | None) -> bytes:
    return (f'Bearer realm="ptx-triage", error="{error}"' if error else 'Bearer realm="ptx-triage"').encode()


class BearerAuth:
    """Pure ASGI middleware: 401 `{"error": {"code": "unauthorized", ...}}` with `WWW-Authenticate: Bearer`
    unless the path is open or the request carries an accepted token. The OpenAPI document (/docs.json)
    gets how-to text and, with auth on, the bearer security scheme, so Swagger UI offers "Authorize".
    `config=None` (no token configured) lets everything through and only documents how to switch auth on:
    BentoML builds the document itself, so this is the one place that can say it."""

    def __init__(self, app: App, config: AuthConfig | None) -> None:
        self.app, self.config = app, config
        self.pages = PageGate(app, config)  # /worklist/*: sessions for people (service/http/pages/gate.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        path = scope.get("path", "")
        if is_page_path(path):
            await self.pages(scope, receive, send)
            return
        if path == "/docs.json" and scope["type"] == "http" and (self.config is None or self.config.is_open(path)):
            await self.app(scope, receive, _SpecPatch(send, self.config))
            return
        if self.config is None or self.config.is_open(path):
            await self._pass(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", ()))
        role = None if token is None else self.config.role_of(token)
        if role is Role.READ_ONLY and scope.get("method", "GET") not in SAFE_METHODS:
            body = json.dumps({"error": {"code": "read_only", "message": "this token's role is read-only: "
                                                                         "GET and HEAD only"}}).encode()
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if role is not None:
            await self._pass(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if token is None:
            message, error = "this endpoint needs an Authorization: Bearer <token> header (PTX_API_TOKEN)", None
        else:
            message, error = "the bearer token is not accepted", "invalid_token"
        body = json.dumps({"error": {"code": "unauthorized", "message": message}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", _challenge(error))]})
        await send({"type": "http.response.body", "body": body})

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        """On to the app; `/` is our front page (pages/front.py) instead of BentoML's."""
        if scope.get("path") == "/" and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            body = front_html()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
            return
        await self.app(scope, receive, send)


HOW_TO = """## Authentication

Off unless a token is configured: set `PTX_API_TOKEN` (at least 16 characters, e.g. `openssl rand -hex 32`)
or `PTX_API_TOKEN_FILE` (one token per line; two lines while rotating). Then every endpoint needs
`Authorization: Bearer <token>` and answers 401 `{"error": {"code": "unauthorized"}}` without it, except:
`/healthz`, `/livez`, `/readyz` (open unless `PTX_AUTH_OPEN_HEALTH=false`), this page and `/docs.json`
(open unless `PTX_AUTH_OPEN_DOCS=false`). `/metrics` needs the token unless `PTX_AUTH_OPEN_METRICS=true`.
Serve it behind a TLS reverse proxy: a bearer token over plain HTTP can be read on the network.
People sign in to the [worklist](./worklist/) with a token and their login instead (a session cookie).

Authentication is **{state}** on this server."""


def document_security(spec: dict[str, Any], config: AuthConfig | None) -> dict[str, Any]:
    """Introduce the project (in place of BentoML's template text and contact), say how authentication
    works and, when it is on, declare the bearer scheme: required everywhere, except on the open paths."""
    info = spec.setdefault("info", {})
    info["description"] = front_page() + "\n\n" + HOW_TO.replace("{state}", "off" if config is None else "on")
    info.pop("contact", None)  # BentoML's team is not who runs this service
    if info.get("version") in (None, "None"):  # BentoML's value when serving from source, not a built bento
        info["version"] = "source"
    if config is None:
        return spec
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME_NAME] = {
        "type": "http", "scheme": "bearer",
        "description": "PTX_API_TOKEN (or a line of PTX_API_TOKEN_FILE); send `Authorization: Bearer <token>`"}
    spec["security"] = [{SCHEME_NAME: []}]
    for path, item in spec.get("paths", {}).items():
        if config.is_open(path) and isinstance(item, dict):
            for operation in item.values():
                if isinstance(operation, dict):
                    operation["security"] = []
    return spec


class _SpecPatch:
    """A `send` that holds the /docs.json response, adds the security scheme and sends it on."""

    def __init__(self, send: Send, config: AuthConfig | None) -> None:
        self.send, self.config = send, config
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            if message.get("status") != 200:
                self.start = None
                await self.send(message)
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.chunks)
        try:
            body = json.dumps(document_security(json.loads(body), self.config)).encode()
        except (ValueError, AttributeError):
            log.warning("the OpenAPI document could not be parsed; sent without its security scheme")
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

