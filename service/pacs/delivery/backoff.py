"""When a failed delivery (or notification) is tried again: exponential backoff with jitter.

Jitter so that a destination that comes back after an outage is not met by every queued object at the same
instant; the cap so that a long outage is still retried hourly. Its own module: the dispatcher and the
notification outbox share it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before the next attempt after `attempts` failed ones: base · factor^(attempts-1), capped at
    `max_s`, minus a random share of up to `jitter` of it (so it lies in [(1 - jitter)·d, d])."""

    base_s: float = 30.0
    factor: float = 2.0
    max_s: float = 3600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(f"backoff needs 0 < base ({self.base_s}) <= max ({self.max_s})")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def ceiling_s(self, attempts: int) -> float:
        exponent = max(0, attempts - 1)
        try:
            delay = self.base_s * self.factor ** exponent
        except OverflowError:
            delay = self.max_s
        return min(self.max_s, delay)

    def delay_s(self, attempts: int, rng: random.Random, *, longest: bool = False) -> float:
        """The jittered delay after `attempts` failures; `longest`: the cap's (for a rejection)."""
        ceiling = self.max_s if longest else self.ceiling_s(attempts)
        return ceiling * (1.0 - self.jitter * rng.random())


__all__ = ["Backoff"]
