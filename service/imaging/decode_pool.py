"""Compressed pixel data decoded in worker processes with a deadline and a memory cap.

Why processes: a decoder is C code running in a thread, and a thread cannot be stopped. A pathological
codestream (or a decoder bug) would hold one of the edge's few decode threads for as long as it likes, and
a crash or a runaway allocation inside it would take the whole edge down. A worker process can be killed
when its decode overruns `PTX_DECODE_TIMEOUT_S`, its address space is capped (`PTX_DECODE_MEMORY_MB`, on
top of what the worker holds after start-up), and if it dies the caller gets a named rejection and the
pool a fresh worker. Only compressed data comes here: uncompressed pixels are a copy of bytes whose size
the header checks have already bounded.

Why our own small pool and not `concurrent.futures.ProcessPoolExecutor`: the executor cannot kill the one
worker that overran without breaking every other decode in flight; here each decode owns one worker for
its duration, and only that worker is replaced. Workers start from a forkserver (never a plain fork of a
threaded server: see `service.processes.safe_context`), lazily, one per concurrent decode at most.

Cost: the compressed frame goes to the worker and the decoded array comes back through a pipe (pickle);
see `load_tests/bench_decode_isolation.py` and docs/benchmarks.md for the measured overhead.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset

from service.imaging.radiograph import RadiographError, RejectionCode
from service.processes import safe_context

log = logging.getLogger("ptx.decode")

DEFAULT_MEMORY_MB = 2048
# Elements the decoders read: the Image Pixel module (group 0028), Pixel Data and its offset tables.
_PIXEL_GROUP = 0x0028
_PIXEL_TAGS = (0x7FE00010, 0x7FE00001, 0x7FE00002)


def pixel_subset(ds: Dataset) -> Dataset:
    """What a decoder needs from `ds` (no patient attributes cross the process boundary, and less to copy)."""
    subset = Dataset()
    subset.file_meta = FileMetaDataset()
    subset.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    for tag in ds.keys():
        if tag.group == _PIXEL_GROUP or int(tag) in _PIXEL_TAGS:
            subset.add(ds[tag])
    return subset


def _limit_memory(budget_mb: int) -> None:
    """Cap this worker's address space at what it holds now plus `budget_mb`."""
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + budget_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_main(conn: Connection, decode: Callable[..., Any], memory_mb: int) -> None:
    """A worker: say "ready" once started, then decode each (dataset, arguments) received and answer
    ("ok", what `decode` returned) or ("error", code, message)."""
    try:
        _limit_memory(memory_mb)
    except (OSError, ValueError) as exc:  # no /proc or no RLIMIT_AS: decode without the cap, and say so
        log.warning("decode worker runs without a memory cap: %s", exc)
    try:  # the edge closing its end (at a stop) ends the worker: EOF, or ECONNRESET if it left data unread
        conn.send(("ready",))
        while True:
            ds, args = conn.recv()
            conn.send(_answer(decode, ds, args, memory_mb))
    except (EOFError, OSError):
        return


def _answer(decode: Callable[..., Any], ds: Any, args: tuple[Any, ...], memory_mb: int) -> tuple[Any, ...]:
    """("ok", what `decode` returned) or ("error", code, message): a failed decode is answered, never raised."""
    try:
        return ("ok", decode(ds, *args))
    except RadiographError as exc:
        return ("error", exc.code.value, exc.message)
    except MemoryError:
        return ("error", RejectionCode.CORRUPT_PIXEL_DATA.value,
                f"decoding needs more than the decode memory limit of {memory_mb} MB (PTX_DECODE_MEMORY_MB)")
    except Exception as exc:  # noqa: BLE001 -- a decoder bug is answered, and the worker lives on
        return ("error", RejectionCode.CORRUPT_PIXEL_DATA.value,
                f"pixel data could not be decoded ({type(exc).__name__})")


class _Worker:
    """One worker process and our end of its pipe. `ready` once it has said so (imports done)."""

    def __init__(self, context: Any, decode: Callable[..., Any], memory_mb: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, decode, memory_mb), daemon=True,
                                       name="ptx-decode")
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready:
            if not self.conn.poll(timeout_s) or self.conn.recv() != ("ready",):
                raise OSError(f"the decode worker did not start within {timeout_s:g} s")
            self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class DecodePool:
    """`size` worker processes at most, started on demand; each `decode` call borrows one for its duration."""

    def __init__(self, size: int, timeout_s: float, memory_mb: int = DEFAULT_MEMORY_MB,
                 *, decode: Callable[..., Any]) -> None:
        if size < 1 or timeout_s <= 0 or memory_mb < 64:
            raise ValueError(f"DecodePool needs size >= 1, timeout_s > 0, memory_mb >= 64; got {size}, "
                             f"{timeout_s}, {memory_mb}")
        self.size, self.timeout_s, self.memory_mb = size, timeout_s, memory_mb
        self._decode = decode  # handed in (service.imaging.decoding.decode_here): the pool imports no decoder
        self._context = safe_context()  # forkserver, never a plain fork of a threaded server
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._started = 0
        self._lock = threading.Lock()
        self.replaced = 0  # workers killed (overran) or found dead, and replaced

    def _borrow(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._started < self.size:
                self._started += 1
                try:
                    return _Worker(self._context, self._decode, self.memory_mb)
                except BaseException:
                    self._started -= 1
                    raise
        try:  # every worker busy: more callers than `size` (the edge never has more; a library user might)
            return self._idle.get(timeout=self.timeout_s + STARTUP_TIMEOUT_S)
        except queue.Empty:
            raise RadiographError(
                RejectionCode.DECODE_TIMEOUT,
                f"all {self.size} decode workers stayed busy beyond the decode time limit of {self.timeout_s:g} s "
                "(PTX_DECODE_TIMEOUT_S)",
            ) from None

    def _discard(self, worker: _Worker) -> None:
        """Kill `worker` and start its replacement now (a caller may be waiting for a free worker)."""
        worker.kill()
        self.replaced += 1
        try:
            self._idle.put(_Worker(self._context, self._decode, self.memory_mb))
        except Exception:  # noqa: BLE001 -- could not start one: the next borrower tries again
            log.exception("could not start a replacement decode worker")
            with self._lock:
                self._started -= 1

    def decode(self, ds: Dataset, *args: Any) -> Any:
        """`decode(ds, *args)` in a worker; RadiographError DECODE_TIMEOUT when it overruns `timeout_s`."""
        subset = pixel_subset(ds)
        worker = self._borrow()
        try:
            worker.wait_ready(STARTUP_TIMEOUT_S)  # start-up (imports) is not the decode: not on its clock
            started = time.monotonic()
            worker.conn.send((subset, args))
            answer = worker.conn.recv() if worker.conn.poll(self.timeout_s) else None
        except (EOFError, OSError) as exc:
            code = worker.process.exitcode
            self._discard(worker)
            log.warning("decode worker lost (exit %s, %s); replaced", code, type(exc).__name__)
            raise RadiographError(
                RejectionCode.CORRUPT_PIXEL_DATA,
                f"the decoder process stopped while decoding (exit {code}): corrupt data, or more than the "
                f"decode memory limit of {self.memory_mb} MB (PTX_DECODE_MEMORY_MB)",
            ) from None
        if answer is None:
            self._discard(worker)
            log.warning("decode overran %.1f s; worker killed and replaced", time.monotonic() - started)
            raise RadiographError(
                RejectionCode.DECODE_TIMEOUT,
                f"decoding the pixel data took longer than the limit of {self.timeout_s:g} s (PTX_DECODE_TIMEOUT_S)",
            )
        self._idle.put(worker)
        if answer[0] == "ok":
            return answer[1]
        raise RadiographError(RejectionCode(answer[1]), answer[2])

    def prestart(self) -> None:
        """Start every worker now (they import in the background), so no request waits for a start-up."""
        with self._lock:
            while self._started < self.size:
                self._started += 1
                self._idle.put(_Worker(self._context, self._decode, self.memory_mb))

    def close(self) -> None:
        """Stop the idle workers (busy ones are stopped by whoever holds them, or with the process)."""
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            worker.kill()
            with self._lock:
                self._started -= 1


STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports numpy and pydicom: seconds on a busy box, never a minute
_POOLS: dict[tuple[int, float, int, Callable[..., Any]], DecodePool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(timeout_s: float, memory_mb: int, workers: int, decode: Callable[..., Any]) -> DecodePool:
    """This process's pool for these limits and this decode function (one each, made on first use)."""
    key = (workers, timeout_s, memory_mb, decode)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = DecodePool(workers, timeout_s, memory_mb, decode=decode)
    return pool
