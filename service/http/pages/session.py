"""Sessions for people: a signed cookie instead of a header a person would have to craft (issue 14 §4).

    sign-in form (token + reader's login) ─▶ auth.BearerAuth checks the token ─▶ Set-Cookie: ptx_session=…
    later page requests ─▶ BearerAuth verifies the cookie ─▶ scope["ptx.reader"] = Reader(login, role, csrf)

Why a signed cookie and no session table: the edge may run several worker processes and restart at any time;
a cookie that carries its own claims (reader, role, expiry, CSRF secret) signed with HMAC-SHA256 is valid in
every process without shared state. The signing key is derived from the digest of the token the person signed
in with, so removing a token from PTX_API_TOKEN_FILE ends every session opened with it, and no new secret
has to be configured. The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page
sends it) and Secure whenever the request came over TLS or through a proxy saying so (X-Forwarded-Proto).

CSRF: SameSite=Strict already keeps other sites' requests cookie-less; on top, every POST from a page must
come from this origin (Origin, else Referer, checked against Host) and carry the session's CSRF secret
(double submit: a hidden form field or the X-CSRF-Token header htmx sends), compared in constant time.
This module is pure (no service imports): `auth.py` and the pages both use it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

COOKIE = "ptx_session"
COOKIE_PATH = "/worklist"
SESSION_S = 12 * 3600  # one shift: a reader signs in again the next day
MAX_READER = 64  # the same bound as the acknowledgement's `by`
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
_KEY_LABEL = b"ptx-session-v1"


class Role(str, Enum):
    """What a token (and the sessions opened with it) may do: a reviewer acknowledges, read-only only looks."""

    REVIEWER = "reviewer"
    READ_ONLY = "read-only"


@dataclass(frozen=True)
class Reader:
    """Who is using a page: their login (None for a bearer-token caller), role and the session's CSRF secret."""

    login: str | None
    role: Role
    csrf: str | None = None

    @property
    def may_review(self) -> bool:
        return self.role is Role.REVIEWER


def check_login(value: str) -> str:
    """A reader's login as typed into the sign-in form, or ValueError saying what is wrong with it."""
    value = value.strip()
    if not value:
        raise ValueError("your login is needed: it is kept with your acknowledgements")
    if len(value) > MAX_READER or not value.isprintable():
        raise ValueError(f"a login is at most {MAX_READER} printable characters")
    return value


def session_key(token_digest: bytes) -> bytes:
    """The signing key of sessions opened with one token: a derivation of its digest, never the token."""
    return hmac.new(token_digest, _KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, login: str, role: Role, now: float | None = None) -> str:
    """A cookie value for `login`: its claims, then their HMAC under `key`."""
    claims = {"r": login, "o": role.value, "e": int((time.time() if now is None else now) + SESSION_S),
              "c": secrets.token_urlsafe(24)}
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def verify(value: str, keys: Sequence[bytes], now: float | None = None) -> Reader | None:
    """The reader a cookie value names, or None: unsigned, signed by no current key, malformed or expired.
    Every key is tried (the comparison does not stop at the first), as `AuthConfig.accepts` does."""
    body, _, signature = value.partition(".")
    if not body or not signature or len(value) > 1024:
        return None
    try:
        presented = _unb64(signature)
    except ValueError:
        return None
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(hmac.new(key, body.encode(), hashlib.sha256).digest(), presented)
    if not matched:
        return None
    try:
        claims = json.loads(_unb64(body))
        reader, role, csrf = check_login(str(claims["r"])), Role(claims["o"]), str(claims["c"])
        expires = int(claims["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires < (time.time() if now is None else now):
        return None
    return Reader(reader, role, csrf)


def headers_of(scope: Mapping[str, Any]) -> dict[str, str]:
    """The request's headers, lower-case names, latin-1 values (the first of a repeated header)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def cookie_value(scope: Mapping[str, Any]) -> str | None:
    """The session cookie of a request, if it sent one."""
    header = headers_of(scope).get("cookie")
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 -- http.cookies raises CookieError or worse on junk: no session then
        return None
    morsel = jar.get(COOKIE)
    return None if morsel is None else morsel.value


def is_https(scope: Mapping[str, Any]) -> bool:
    """Over TLS here, or behind a proxy that terminated it and says so (then the cookie must be Secure)."""
    forwarded = headers_of(scope).get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return scope.get("scheme") == "https" or forwarded == "https"


def set_cookie(value: str, secure: bool) -> bytes:
    """The Set-Cookie header value for a new session."""
    flags = f"; Path={COOKIE_PATH}; Max-Age={SESSION_S}; HttpOnly; SameSite=Strict"
    return f"{COOKIE}={value}{flags}{'; Secure' if secure else ''}".encode("ascii")


def clear_cookie(secure: bool) -> bytes:
    return f"{COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; SameSite=Strict{'; Secure' if secure else ''}".encode()


def same_origin(scope: Mapping[str, Any]) -> bool:
    """A state-changing request from one of our own pages: its Origin (or, without one, its Referer) names the
    host it was sent to. Neither header: refused (every browser sends Origin on a POST form or fetch)."""
    headers = headers_of(scope)
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null":
        return False
    host = headers.get("x-forwarded-host", headers.get("host", "")).split(",")[0].strip().lower()
    return bool(host) and urlsplit(source).netloc.lower() == host


def csrf_matches(reader: Reader | None, presented: str | None) -> bool:
    """The double-submit check: the secret in the form or header equals the session's. Without a session (no
    token configured: nothing to steal) only the origin check applies."""
    if reader is None or reader.csrf is None:
        return True
    return presented is not None and hmac.compare_digest(presented.encode(), reader.csrf.encode())


def safe_next(target: str | None, default: str = f"{COOKIE_PATH}/") -> str:
    """Where to go after signing in: a path of ours, never another site (`//evil`, `https://…`, `/\\evil`)."""
    if not target or not target.startswith(COOKIE_PATH) or "//" in target or "\\" in target:
        return default
    if any(ord(ch) < 0x21 for ch in target):
        return default
    return target


def keys_for(digests: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(session_key(digest) for digest in digests)
