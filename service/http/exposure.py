"""Not open by default (issue 13 §7): the edge refuses to start on a non-loopback address without a token.

Without PTX_API_TOKEN(_FILE) anyone who reaches the port reads the worklist and triages films. On loopback
that is the one user of a workstation (`make serve`) or a reverse proxy that authenticates; on any other
address it is the whole network, so start-up stops with one line naming the three ways out: a token, a
loopback address, or PTX_ALLOW_ANONYMOUS=true, which serves anonymously on purpose and says so loudly.

How the address is known: `bentoml serve --host H` (or BENTOML_HOST, else BentoML's configured
`http.host`, 0.0.0.0 by default) is a parameter of the click command that imports `service.app` before any
worker starts, so the check runs there and SystemExit ends the command. Each worker imports it again under
its own click command, which is handed the listening socket (`--fd`): there the check reads the address the
socket is really bound to. Anything else that imports the module (`bentoml build`, a test) serves nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

import click

from service.errors import ServiceError
from service.settings import Settings

log = logging.getLogger("ptx.app")


class ExposureError(ServiceError):
    """The edge would serve a non-loopback address anonymously without being told to."""

    code = "exposed_without_token"


def serving_host() -> str | None:
    """The address the HTTP edge is (to be) bound to, or None when this process serves nothing."""
    context = click.get_current_context(silent=True)
    params: dict[str, Any] = context.params if context is not None else {}
    if params.get("fd") is not None:  # a BentoML worker: the socket it was handed
        return bound_host(params["fd"])
    if "host" in params and "port" in params:  # `bentoml serve`
        from bentoml._internal.container import BentoMLContainer

        return str(params["host"] or BentoMLContainer.http.host.get())
    return None


def bound_host(fd: int) -> str:
    """The host part of the address socket `fd` is bound to ("unix" for a Unix socket: local by nature)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        name = sock.getsockname()
    return str(name[0]) if isinstance(name, tuple) else "unix"


def is_loopback(host: str) -> bool:
    if host in ("unix", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def check(settings: Settings, authenticated: bool, host: str | None) -> str | None:
    """Raise ExposureError for an anonymous non-loopback edge; the warning to log when it is allowed."""
    if host is None or authenticated or is_loopback(host):
        return None
    if not settings.allow_anonymous:
        raise ExposureError(
            f"listening on {host} (not loopback) without an API token would let anyone on the network read the "
            "worklist and send films; set PTX_API_TOKEN or PTX_API_TOKEN_FILE (docs/security.md), bind "
            "127.0.0.1 (bentoml serve --host 127.0.0.1), or set PTX_ALLOW_ANONYMOUS=true to serve without "
            "authentication on purpose")
    return (f"ANONYMOUS ACCESS: listening on {host} without an API token (PTX_ALLOW_ANONYMOUS=true): anyone "
            "who reaches this port can read the worklist and send films")


def guard(settings: Settings, auth: object | None) -> None:
    """`check` for this process, logging what it decided: at start-up, before anything is served."""
    warning = check(settings, auth is not None, serving_host())
    if warning is not None:
        log.warning(warning)
    if auth is not None:
        log.info("bearer authentication on: %r", auth)
