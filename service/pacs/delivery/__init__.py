"""Delivery of result objects (SEG, SR, SC) to PACS destinations by C-STORE or DICOMweb STOW-RS (issue #5 §5).

    results written ─▶ Dispatcher.enqueue(study, object, kind, path)      one delivery per destination
                                 │                                           (store.add_delivery, idempotent)
    one thread per destination ─▶ run_once: store.due_deliveries(destination)
                                 ├─ sender.send(path)
                                 └─ store.delivery_attempt(ok | error + next_attempt_at)   (never deleted)

Why this shape:

* **Intake never waits for a PACS** (issue #7). `enqueue` only writes rows; the sending happens on the
  dispatcher's own threads (one per destination), never on the caller's thread or event loop, and every
  network step has a timeout, so an unreachable or hung PACS costs its thread a bounded time and nothing
  else.
* **Nothing is dropped.** A delivery leaves `pending` only as `delivered` or, once its attempts are spent,
  `failed`; both stay in the store (and its API) with the last error. Delivery is at least once: a crash
  between a send and its record sends the object again, which a PACS treats as the same SOP instance.
* **Backoff.** A failed attempt is retried after `base · factor^(n-1)` seconds (n = attempts so far), capped
  at `max`, minus up to `jitter` of it at random so deliveries that failed together do not retry in lock
  step; a server's `Retry-After` lengthens it (never beyond the cap).
* **A rejected object is retried rarely, not given up at once.** A rejection (C-STORE failure status, STOW
  409, no accepted presentation context, a refused association) will not succeed by itself, but it often
  succeeds once the PACS administrator changes its configuration. So a non-retryable error is recorded like
  any other failure, with the longest backoff: the delivery stays visible (pending, then failed once its
  attempts are spent) with the receiver's reason; an operator can send a failed one again
  (`POST /v1/deliveries/{id}/retry`).
* **One unreachable destination does not slow the others.** Each destination has its own thread and asks
  the store for its own due deliveries, so one waiting out a timeout (a black hole: connects, never
  answers) delays nobody else's next round. When a destination is found down (no connection, association
  refused or aborted, timeout, HTTP 5xx), its remaining deliveries of that round are recorded with the
  same error instead of each waiting out its own timeout. (They must be recorded, not skipped: the store
  hands out the earliest due deliveries first, and unrecorded ones would be handed out again.)
* Any number of dispatchers may share one database: each round claims its rows with a lease (service/store/claims.py).
"""

from service.pacs.delivery.cstore import CStoreSender
from service.pacs.delivery.destinations import Destination, parse_destinations
from service.pacs.delivery.dispatcher import (
    Backoff,
    Dispatcher,
    make_sender,
    make_senders,
)
from service.pacs.delivery.sender import DeliveryError, Sender
from service.pacs.delivery.stow import StowSender

__all__ = [
    "Backoff", "CStoreSender", "DeliveryError", "Destination", "Dispatcher", "Sender", "StowSender", "make_sender",
    "make_senders", "parse_destinations",
]
