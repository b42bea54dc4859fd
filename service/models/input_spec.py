"""What a model expects as input, as its manifest states it: size, normalisation, channels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: a square `size`, (x − mean) / std normalisation, `channels` copies of the film."""

    size: int
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1

    def __post_init__(self) -> None:
        if self.size < 32 or self.size % 32:
            raise ValueError(f"input size must be a multiple of 32 and at least 32, got {self.size}")
        if not self.std > 0:
            raise ValueError(f"normalisation std must be positive, got {self.std}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
