"""Who may send us DICOM: calling AE titles, each optionally tied to source addresses or networks.

    PTX_DICOM_ALLOWED_AES = "PACS1@10.0.0.5, MOD@10.1.0.0/16, MOD@fd00::/8, WORKSTATION"

An entry `AE` lets that calling AE title in from any address; `AE@address` or `AE@network/prefix` only from
there; several entries for one title add up. Why addresses at all: an AE title is a plain string that any
host on the network can claim, whereas the source address of an established TCP connection cannot be
forged without controlling the route, so `AE@address` is what stops a laptop calling itself "PACS1".

Matching: the title exactly (AE titles are case-sensitive strings; surrounding spaces are padding), the
address with `ipaddress` (an IPv4 peer seen as `::ffff:a.b.c.d` on a dual-stack socket matches its IPv4
entry). Host names are refused: a name resolved once at start-up would silently go stale.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_AE_LENGTH = 16


@dataclass(frozen=True)
class CallingAeAllowlist:
    """AE title → the networks it may call from (an empty tuple: any address)."""

    entries: dict[str, tuple[Network, ...]]

    @classmethod
    def parse(cls, value: str | Iterable[str]) -> CallingAeAllowlist:
        """From the setting's text (comma-separated) or a list of entries; ValueError names the bad entry."""
        items = value.split(",") if isinstance(value, str) else list(value)
        entries: dict[str, list[Network] | None] = {}
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            title, at, where = item.partition("@")
            title = title.strip()
            if not title or len(title) > MAX_AE_LENGTH or "\\" in title or not title.isprintable():
                raise ValueError(f"calling AE entry {item!r}: the AE title must be 1 to {MAX_AE_LENGTH} printable "
                                 "characters without a backslash")
            network = None
            if at:
                try:
                    network = ipaddress.ip_network(where.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"calling AE entry {item!r}: {where.strip()!r} is not an IP address or "
                                     "network (e.g. 10.0.0.5 or 10.1.0.0/16; host names are not accepted)") from None
            known = entries.get(title, [])
            if network is None or known is None:
                entries[title] = None  # a bare title: any address
            else:
                entries[title] = [*known, network]
        if not entries:
            raise ValueError("the calling AE allowlist is empty: nobody could send; leave it unset to allow any")
        return cls({title: tuple(networks or ()) for title, networks in entries.items()})

    def allows(self, calling_ae: str, address: str) -> bool:
        """Whether `calling_ae` connecting from `address` may associate."""
        networks = self.entries.get(calling_ae.strip())
        if networks is None:
            return False
        return not networks or _within(address, networks)

    def admits_address(self, address: str) -> bool:
        """Whether some entry lets `address` in under some title: what can be checked at TCP accept, before
        the peer has said who it is (a bare title admits every address). The listener closes a connection
        from any other address before it holds a thread or an association slot."""
        if any(not networks for networks in self.entries.values()):
            return True
        return _within(address, tuple(network for networks in self.entries.values() for network in networks))

    def describe(self) -> str:
        """For the start-up log line: `PACS1@10.0.0.5/32, WORKSTATION`."""
        parts = []
        for title, networks in sorted(self.entries.items()):
            parts.extend([title] if not networks else [f"{title}@{network}" for network in networks])
        return ", ".join(parts)


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether `address` (an IPv4-mapped IPv6 peer as its IPv4 address too) lies in one of `networks`."""
    try:
        peer = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    candidates = [peer]
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        candidates.append(peer.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks
               if candidate.version == network.version)
