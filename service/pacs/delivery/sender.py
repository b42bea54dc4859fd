"""What every sender is: `send(path)` raising `DeliveryError` (retryable or not, destination down or not)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from service.errors import ServiceError
from service.pacs.delivery.destinations import Destination


class DeliveryError(ServiceError):
    """One send failed. `retryable`: may succeed later by itself (network, busy, out of resources) rather
    than being a rejection of the object or of us. `destination_down`: the failure concerns the destination,
    not this object (no connection, association refused, timeout, 5xx), so the round's other deliveries to
    it would fail the same way. `retry_after_s`: the receiver asked to wait at least this long."""

    def __init__(self, message: str, retryable: bool, *, destination_down: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, code="delivery_failed", http_status=502)
        self.retryable = retryable
        self.destination_down = destination_down
        self.retry_after_s = retry_after_s


class Sender(Protocol):
    """Sends one DICOM Part 10 file to one destination; raises DeliveryError, returns on success."""

    destination: Destination

    def send(self, path: str | Path) -> None: ...

    def close(self) -> None: ...


def _read_bytes(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DeliveryError(f"the object file is missing: {path}", retryable=False) from None
    except OSError as error:
        raise DeliveryError(f"cannot read the object file {path}: {error.strerror or error}", retryable=True) from None
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DeliveryError(f"{path} is not a DICOM Part 10 file (no 'DICM' after the preamble)", retryable=False)
    return data


# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): which failures may pass on a later attempt.
