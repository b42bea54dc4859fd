"""Where results go: `[name=]dicom://AE@host:port` and `[name=]dicomweb+http(s)://host:port/path` destinations."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

DEFAULT_CALLING_AE = "PTX_TRIAGE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAMED = re.compile(r"^([^=:/]+)=(.+)$")  # "name=URL": a URL's scheme holds no '=' before its "://"
_HTTP_SCHEMES = {"dicomweb+http": "http", "dicomweb+https": "https", "http": "http", "https": "https"}


# --- destinations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM C-STORE SCP (`dicom://AE@host:port`) or a DICOMweb service
    (`dicomweb+https://host/path`, or plain `https://` / `http://`) that takes STOW-RS at `{base_url}/studies`.

    `name` keys the deliveries in the store and labels logs and metrics, so it must stay the same across
    restarts (give one explicitly as `name=URL`; the default is the URL without credentials). Credentials
    from a DICOMweb URL's user-info are kept apart from the URL and out of the repr, the name and every
    message, so they are never logged.
    """

    name: str
    protocol: Literal["dicom", "dicomweb"]
    host: str
    port: int
    ae_title: str | None = None  # dicom: the called AE title
    base_url: str | None = None  # dicomweb: scheme://host[:port]/path, without credentials or trailing '/'
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        """The destination as a URL without credentials (for messages)."""
        if self.protocol == "dicom":
            return f"dicom://{self.ae_title}@{_host_for_url(self.host)}:{self.port}"
        assert self.base_url is not None
        return self.base_url

    @property
    def stow_url(self) -> str:
        if self.protocol != "dicomweb" or self.base_url is None:
            raise ValueError(f"destination {self.name!r} is not a DICOMweb destination")
        return f"{self.base_url}/studies"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """One destination from its setting: `[name=]dicom://AE@host:port` or `[name=]dicomweb+https://...`.
        Raises ValueError naming what is wrong (without echoing credentials)."""
        text = text.strip()
        if not text:
            raise ValueError("a destination must not be empty")
        name: str | None = None
        named = _NAMED.match(text)
        if named:
            name, text = named.group(1).strip(), named.group(2).strip()
            if not _NAME.match(name):
                raise ValueError(f"destination name {name!r} must be 1 to 64 letters, digits, '_', '.', '-' "
                                 "(it labels metrics and keys the deliveries)")
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme == "dicom":
            destination = _parse_dicom(text)
        elif scheme in _HTTP_SCHEMES:
            destination = _parse_dicomweb(text, _HTTP_SCHEMES[scheme])
        else:
            shown = scheme or "no scheme"
            raise ValueError(f"destination must start with dicom://, dicomweb+http(s):// or http(s)://, got {shown} "
                             "(e.g. dicom://PACS@10.0.0.5:104 or dicomweb+https://pacs.example/dicom-web)")
        if name is not None:
            object.__setattr__(destination, "name", name)
        return destination


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split(text: str, what: str) -> tuple[SplitResult, str, int | None]:
    """urlsplit with the errors a settings reader can act on; the credentials never enter a message."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:  # bad port or bracketed host; the message has no user-info in it
        reason = "port must be a number from 1 to 65535" if "port" in str(error).lower() else str(error)
        raise ValueError(f"{what} destination is not a valid URL: {reason}") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{what} destination names no host")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{what} destination port must be from 1 to 65535, got {port}")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} destination must not have a query or fragment ('?' or '#')")
    return parts, host, port


def _parse_dicom(text: str) -> Destination:
    parts, host, port = _split(text, "dicom://")
    netloc = parts.netloc
    if "@" not in netloc:
        raise ValueError("dicom:// destination needs the called AE title before '@', e.g. dicom://PACS@host:104")
    userinfo = netloc.rsplit("@", 1)[0]
    if ":" in userinfo:
        raise ValueError("dicom:// destination takes an AE title, not user:password, before '@'")
    ae_title = unquote(userinfo)
    if not 1 <= len(ae_title) <= 16 or not ae_title.isascii() or "\\" in ae_title \
            or not ae_title.strip() or any(ord(c) < 32 or ord(c) == 127 for c in ae_title):
        raise ValueError(f"AE title {ae_title!r} must be 1 to 16 printable ASCII characters without '\\'")
    if port is None:
        raise ValueError("dicom:// destination needs a port, e.g. dicom://PACS@host:104")
    if parts.path not in ("", "/"):
        raise ValueError("dicom:// destination takes no path")
    destination = Destination(name="", protocol="dicom", host=host, port=port, ae_title=ae_title.strip())
    object.__setattr__(destination, "name", destination.url)
    return destination


def _parse_dicomweb(text: str, scheme: str) -> Destination:
    parts, host, port = _split(text, "DICOMweb")
    username, password = parts.username, parts.password
    if password is not None and username is None:
        raise ValueError("DICOMweb destination has a password but no user name")
    path = parts.path.rstrip("/")
    base = f"{scheme}://{_host_for_url(host)}{f':{port}' if port is not None else ''}{path}"
    return Destination(name=base, protocol="dicomweb", host=host, port=port or (443 if scheme == "https" else 80),
                       base_url=base, username=unquote(username) if username is not None else None,
                       password=unquote(password) if password is not None else None)


def parse_destinations(value: str | Iterable[str] | None) -> list[Destination]:
    """The destinations of a setting: comma-separated (or a list, from TOML); empty or None: none.
    Names must be unique and no target may be listed twice (it would get every object twice)."""
    if value is None:
        return []
    items = [item for item in (value.split(",") if isinstance(value, str) else value) if item.strip()]
    destinations = [Destination.parse(item) for item in items]
    seen: dict[str, Destination] = {}
    for destination in destinations:
        if destination.name in seen:
            raise ValueError(f"destination name {destination.name!r} is used twice")
        for other in seen.values():
            if (other.protocol, other.host, other.port, other.ae_title, other.base_url) == \
                    (destination.protocol, destination.host, destination.port, destination.ae_title,
                     destination.base_url):
                raise ValueError(f"destinations {other.name!r} and {destination.name!r} name the same target")
        seen[destination.name] = destination
    return destinations


# --- senders -----------------------------------------------------------------------------------------------
