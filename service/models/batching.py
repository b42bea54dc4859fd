"""Work-conserving adaptive batching: BentoML's batcher without its learned idle wait (`PTX_GREEDY_BATCHING`).

BentoML 1.4.39's `CorkDispatcher` holds a batch back while `n · (wait of the newest request + a) ≤ 0.95 · W`,
where `a` is the fitted cost per item and `W` the average time the first request of the recent batches waited
before dispatch. Under saturation that wait is time spent queued behind the busy model, so `W` grows to
hundreds of milliseconds; afterwards the dispatcher keeps idling the model for about `W` before each batch
even when nothing else is coming, and since each batch then waits about 0.95 · W, `W` stays up. Measured
through a real server (demo models): after a 15 s saturating burst a single sequential client went from 49
to 138 ms per film and stayed there (classifier queue wait 4.5 → 86 ms while the model ran 5 ms per batch);
a capacity ladder run after the saturated steps reported p99 at half of saturation 16× the single-request
latency. Its start-up guesses (a = 1.33 s, b = 0.67 s per batch at max_latency 20 s) also make the first
"training" batches wait seconds for company.

For a model worker that runs one batch at a time the best policy is greedy: dispatch as soon as the model is
free, with everything that queued while it was busy (up to max_batch_size). Batches still form under load (as
large as the backlog), and no film waits for an idle model. `install()` makes BentoML's optimizer do that:
its learned wait is kept at 0 and its first guesses are small; everything else (the fitted cost model used
to refuse requests that cannot meet max_latency_ms, the batch sizes) is BentoML's. Guarded: a BentoML
without these internals is left alone (and `install` says so).
"""

from __future__ import annotations

import logging
from typing import Any

from service.settings import Settings

log = logging.getLogger("ptx.batching")

FIRST_GUESS_S = 0.01  # cost per item and per batch assumed until BentoML has fitted real ones


def install() -> bool:
    """Patch BentoML's batching optimizer in this process (idempotent); False where it cannot be patched."""
    try:
        from bentoml._internal.marshal.dispatcher import Optimizer
    except ImportError:
        log.warning("BentoML's dispatcher not found: adaptive batching keeps its own wait policy")
        return False
    if getattr(Optimizer, "_ptx_greedy", False):
        return True
    if not all(hasattr(Optimizer, name) for name in ("__init__", "trigger_refresh")):
        log.warning("BentoML's batching optimizer has changed: adaptive batching keeps its own wait policy")
        return False
    original_init, original_refresh = Optimizer.__init__, Optimizer.trigger_refresh

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.o_a, self.o_b = min(self.o_a, FIRST_GUESS_S), min(self.o_b, FIRST_GUESS_S)
        self.wait = 0

    def trigger_refresh(self: Any) -> None:
        original_refresh(self)
        self.wait = 0  # never hold a batch back for company: dispatch whenever the model is free

    Optimizer.__init__ = __init__
    Optimizer.trigger_refresh = trigger_refresh
    Optimizer._ptx_greedy = True
    return True


def api_options(settings: Settings) -> dict[str, Any]:
    """The `@bentoml.api` options of both models' batched methods; installs the greedy policy where asked,
    before BentoML builds the model worker's batchers."""
    if settings.greedy_batching:
        install()
    return {"batchable": True, "batch_dim": 0, "max_batch_size": settings.max_batch_size,
            "max_latency_ms": settings.max_latency_ms}
