"""Claims on the outboxes (deliveries, notifications): how N dispatchers share one store and send each row once.

    dispatcher ─▶ claim_deliveries(lease) ─▶ send each row ─▶ delivery_attempt(id, ..., claim=token)
                                          └▶ release_deliveries(token): rows it did not get to, due again

Why a claim with a lease, and not a lock held while sending: a send can take a sender's whole timeout, and a
database transaction (or connection) held that long by every dispatcher would tie up the pool and the server.
A claim is one short transaction instead: the due rows are selected with `FOR UPDATE SKIP LOCKED` on
PostgreSQL (a row another dispatcher is claiming at that instant is skipped, not waited for), and in the same
statement their next attempt is moved to the end of the lease and a fresh token written into `claim`. Until
the lease ends no other dispatcher sees them as due; a dispatcher that dies mid-send leaves its rows to be
claimed again when the lease runs out. SQLite has no row locks and needs none: its writers are serialised
(`BEGIN IMMEDIATE`), so the same statement is just as exclusive there.

A claim may name its owner (PTX_LISTENER_NAME: `owner/` prefixes the token). A listener that starts again
after being killed releases the claims its name still holds (`release_owned_*`): one listener name runs once
(a StatefulSet pod's name), so nothing else can be sending under it, and the rows its dead self claimed are
sent at once rather than when their lease runs out (up to PTX_DELIVERY_LEASE_S later).

What it guarantees: no two dispatchers send one row while a lease holds (a dispatcher stops sending from a
claim at half its lease, so a send never straddles its end), and an attempt is recorded only by the holder
of the row's current claim (one that outlived its lease is told, and records nothing). What it cannot: a
dispatcher killed after the receiver stored the object but before the attempt was recorded leaves the row to
be sent again; that resend carries the same SOP Instance UID, which a PACS keeps once (a DICOM duplicate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")

DEFAULT_LEASE_S = 300.0  # a claim's life: well over a batch of sends at the senders' timeouts (30 s each)


@dataclass(frozen=True)
class Claim(Generic[Row]):
    """Rows taken by one dispatcher until `until`; `token` proves it when their attempts are recorded."""

    token: str
    until: datetime
    rows: list[Row] = field(default_factory=list)


def owned_token(owner: str | None, random_part: str) -> str:
    """`owner/random` (a listener name has no `/`), or the random part alone."""
    if owner is None:
        return random_part
    if not owner or "/" in owner:
        raise ValueError(f"a claim's owner is a listener name without '/', got {owner!r}")
    return f"{owner}/{random_part}"


def check_lease(lease_s: float) -> float:
    """A lease must be positive: a zero lease would hand every row to every dispatcher."""
    if not lease_s > 0:
        raise ValueError(f"a claim's lease must be positive seconds, got {lease_s}")
    return float(lease_s)


class OutboxClaims(ABC):
    """Claiming rows of the deliveries and notifications outboxes (part of every `ResultsStore`)."""

    @abstractmethod
    def claim_deliveries(self, limit: int, lease_s: float, now: datetime | None = None,
                         destination: str | None = None, exclude: Collection[str] = (),
                         owner: str | None = None) -> Claim[Any]:
        """Claim up to `limit` pending deliveries due at `now` (earliest first; only `destination`'s where
        given, none in `exclude`) until `now + lease_s`: no other claim takes them before then. `owner`: the
        claiming listener's name, so that its next start can release what it left (`release_owned_deliveries`)."""

    @abstractmethod
    def release_owned_deliveries(self, owner: str, due_at: datetime) -> int:
        """Every pending delivery claimed under `owner` due again at `due_at`, unclaimed; returns how many."""

    @abstractmethod
    def release_deliveries(self, token: str, due_at: datetime) -> int:
        """The claim's rows still pending under it (not attempted) due again at `due_at`; returns how many."""

    @abstractmethod
    def claim_notifications(self, limit: int, lease_s: float, now: datetime | None = None,
                            channel: str | None = None, exclude: Collection[str] = (),
                            owner: str | None = None) -> Claim[Any]:
        """As `claim_deliveries`, for pending notifications (of `channel` where given)."""

    @abstractmethod
    def release_owned_notifications(self, owner: str, due_at: datetime) -> int:
        """As `release_owned_deliveries`, for notifications."""

    @abstractmethod
    def release_notifications(self, token: str, due_at: datetime) -> int:
        """As `release_deliveries`, for notifications."""


__all__ = ["DEFAULT_LEASE_S", "Claim", "OutboxClaims", "check_lease", "owned_token"]
