"""Worker processes that are safe to start from a process that already runs threads.

In service/ because the service needs it too (the decode pool) and a built bento ships service/ only;
training (the cache build, synth) uses the same function.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def safe_context() -> BaseContext:
    """forkserver (else spawn), never a plain fork: a process that already runs threads (a server, a test
    session with network clients) can be forked while another thread holds a lock, and the child then hangs
    on it forever (seen: the cache build deadlocked after the PACS tests had run in the same session)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
