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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ServiceError

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
    """Tokens from a file, one per line; blank lines and `#` comments ignored, surrounding whitespace (the
    trailing newline) stripped. A file that group or others can read is used with a warning rather than
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
    return [check_token(token, f"PTX_API_TOKEN_FILE {path} (line {i + 1} of its tokens)")
            for i, token in enumerate(tokens)]


@dataclass(frozen=True)
class AuthConfig:
    """Who may call: the digests of the accepted tokens and which path groups stay open."""

    digests: tuple[bytes, ...]
    open_health: bool = True
    open_metrics: bool = False
    open_docs: bool = True

    def __repr__(self) -> str:  # the digests are not the tokens, but there is no reason to print them either
        return (f"AuthConfig({len(self.digests)} token(s), open_health={self.open_health}, "
                f"open_metrics={self.open_metrics}, open_docs={self.open_docs})")

    @classmethod
    def from_tokens(cls, tokens: Iterable[str], **options: bool) -> AuthConfig:
        digests = tuple(_digest(check_token(token, "a token").encode("ascii")) for token in tokens)
        if not digests:
            raise TokenError("no token given")
        return cls(digests, **options)

    def accepts(self, presented: str) -> bool:
        """Constant-time in the configured tokens: every digest is compared, whichever matches."""
        digest = _digest(presented.encode("utf-8", "surrogatepass"))
        matched = False
        for expected in self.digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched

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
        tokens = [check_token(secret.strip(), "PTX_API_TOKEN")]
    elif settings.api_token_file is not None:
        tokens = read_token_file(Path(settings.api_token_file))
    else:
        return None
    return AuthConfig.from_tokens(tokens, open_health=settings.auth_open_health,
                                  open_metrics=settings.auth_open_metrics, open_docs=settings.auth_open_docs)


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        path = scope.get("path", "")
        if path == "/docs.json" and scope["type"] == "http" and (self.config is None or self.config.is_open(path)):
            await self.app(scope, receive, _SpecPatch(send, self.config))
            return
        if self.config is None or self.config.is_open(path):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", ()))
        if token is not None and self.config.accepts(token):
            await self.app(scope, receive, send)
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


HOW_TO = """## Authentication

Off unless a token is configured: set `PTX_API_TOKEN` (at least 16 characters, e.g. `openssl rand -hex 32`)
or `PTX_API_TOKEN_FILE` (one token per line; two lines while rotating). Then every endpoint needs
`Authorization: Bearer <token>` and answers 401 `{"error": {"code": "unauthorized"}}` without it, except:
`/healthz`, `/livez`, `/readyz` (open unless `PTX_AUTH_OPEN_HEALTH=false`), this page and `/docs.json`
(open unless `PTX_AUTH_OPEN_DOCS=false`). `/metrics` needs the token unless `PTX_AUTH_OPEN_METRICS=true`.
Serve it behind a TLS reverse proxy: a bearer token over plain HTTP can be read on the network.

Authentication is **{state}** on this server."""


def document_security(spec: dict[str, Any], config: AuthConfig | None) -> dict[str, Any]:
    """Say how authentication works in an OpenAPI document and, when it is on, declare the bearer scheme:
    required everywhere, except on the open paths."""
    info = spec.setdefault("info", {})
    info["description"] = HOW_TO.replace("{state}", "off" if config is None else "on") + "\n\n" + info.get(
        "description", "")
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

