"""The decode limits: compressed pixel data decoded in worker processes that are killed when they overrun
PTX_DECODE_TIMEOUT_S, capped at PTX_DECODE_MEMORY_MB, and replaced when they die (service/decode_pool.py).

Misbehaving decoders (tests/slow_decoders.py) stand in for a pathological codestream in the pool's own
logic; real films check that the pool decodes exactly what the thread does; a real JPEG 2000 codestream
that takes longer than a tight limit checks the whole path through `read_radiograph`.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from service.imaging.acceptance import AcceptancePolicy, permissive_policy
from service.imaging.decode_pool import DecodePool, pixel_subset
from service.imaging.decoding import decode_here, decode_pixels
from service.imaging.radiograph import RadiographError, RejectionCode
from service.imaging.reader import read_radiograph
from tests.dicom_factory import dataset
from tests.slow_decoders import CRASH, HUNGRY, SLOW, misbehaving

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
COMPRESSED = ["chest/siim_cr_jpegbaseline_mono2.dcm", "chest/canon_dx_j2k_lossless_mono1_inverse.dcm",
              "other/MR_small_RLE.dcm", "other/MR_small_jpeg_ls_lossless.dcm"]
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(size=2, timeout_s=TIMEOUT_S, memory_mb=512, decode=misbehaving)
    yield pool
    pool.close()


def marked(marker: bytes) -> pydicom.Dataset:
    ds = dataset()
    ds.PixelData = marker + bytes(ds.PixelData)[len(marker):]
    return ds


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is dead too
        return handle.read().split()[2] != "Z"


@pytest.mark.parametrize("name", COMPRESSED)
def test_the_pool_decodes_exactly_what_the_thread_does(pool: DecodePool, realdata: Path, name: str) -> None:
    ds = pydicom.dcmread(realdata / name)
    np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)


def test_only_pixel_attributes_cross_to_the_worker(realdata: Path) -> None:
    ds = pydicom.dcmread(realdata / "chest/siim_cr_jpegbaseline_mono2.dcm")
    subset = pixel_subset(ds)
    assert "PatientID" in ds and "PatientID" not in subset and "StudyInstanceUID" not in subset
    assert {t.group for t in subset.keys()} == {0x0028, 0x7FE0}


def test_a_decode_that_overruns_is_killed_and_named(pool: DecodePool) -> None:
    replaced = pool.replaced
    pool.decode(dataset())  # warm: a worker is up
    started = time.monotonic()
    with pytest.raises(RadiographError) as caught:
        pool.decode(marked(SLOW))
    elapsed = time.monotonic() - started
    assert caught.value.code is RejectionCode.DECODE_TIMEOUT and caught.value.http_status == 422
    assert "PTX_DECODE_TIMEOUT_S" in caught.value.message and f"{TIMEOUT_S:g} s" in caught.value.message
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5
    assert pool.replaced == replaced + 1
    # The pool goes on with a fresh worker.
    ds = dataset()
    np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)


def test_an_overrun_holds_up_no_other_decode(pool: DecodePool) -> None:
    """Two workers: while one is stuck on a slow codestream, the other decodes; only the stuck one dies."""
    replaced = pool.replaced
    outcome: list[BaseException] = []

    def slow() -> None:
        try:
            pool.decode(marked(SLOW))
        except RadiographError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    ds = dataset()
    for _ in range(5):
        pool.decode(ds)
    assert time.monotonic() - started < TIMEOUT_S, "a normal decode waited for the stuck one"
    thread.join(timeout=TIMEOUT_S + 10)
    assert [e.code for e in outcome] == [RejectionCode.DECODE_TIMEOUT]  # type: ignore[attr-defined]
    assert pool.replaced == replaced + 1


def test_a_decode_beyond_the_memory_cap_is_refused_and_the_worker_lives(pool: DecodePool) -> None:
    replaced = pool.replaced
    with pytest.raises(RadiographError) as caught:
        pool.decode(marked(HUNGRY))
    assert caught.value.code is RejectionCode.CORRUPT_PIXEL_DATA
    assert "PTX_DECODE_MEMORY_MB" in caught.value.message and "512 MB" in caught.value.message
    assert pool.replaced == replaced  # a MemoryError is answered; the worker itself is fine
    ds = dataset()
    np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)


def test_a_decoder_crash_is_named_and_the_worker_replaced(pool: DecodePool) -> None:
    replaced = pool.replaced
    with pytest.raises(RadiographError) as caught:
        pool.decode(marked(CRASH))
    assert caught.value.code is RejectionCode.CORRUPT_PIXEL_DATA and "stopped" in caught.value.message
    assert pool.replaced == replaced + 1
    ds = dataset()
    np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)


def test_killed_workers_are_gone(pool: DecodePool) -> None:
    worker = pool._borrow()  # noqa: SLF001 -- the process behind the pool, to watch it die
    pool._idle.put(worker)  # noqa: SLF001
    worker.wait_ready(60)
    pid = worker.process.pid
    with pytest.raises(RadiographError):
        pool.decode(marked(SLOW))  # LIFO: the same worker takes it
    assert not alive(pid)


def _big_j2k(side: int) -> bytes:
    """A real JPEG 2000 lossless film of side x side 12-bit noise: a legitimate codestream whose decode
    takes a second or more here, i.e. longer than a deliberately tight limit."""
    from openjpeg import encode

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(side, side), dtype=np.uint16)
    ds = dataset(pixels)
    ds.PixelData = pydicom.encaps.encapsulate([encode(pixels, bits_stored=12, photometric_interpretation=2)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_real_codestream_slower_than_the_limit_is_refused_through_read_radiograph() -> None:
    data = _big_j2k(2048)
    started = time.monotonic()
    in_thread = read_radiograph(data, permissive_policy())  # no limit: decodes (slowly)
    decode_s = time.monotonic() - started
    limit = 0.2
    assert decode_s > 3 * limit, f"the film decoded in {decode_s:.2f} s: not slow enough to test the limit"
    tight = AcceptancePolicy(modalities=None, sop_classes=None, body_part_tokens=None, min_side=1,
                             decode_timeout_s=limit)
    read_radiograph(_big_j2k(256), tight)  # the pool's worker is started: start-up is not on the decode's clock
    started = time.monotonic()
    with pytest.raises(RadiographError) as caught:
        read_radiograph(data, tight)
    assert caught.value.code is RejectionCode.DECODE_TIMEOUT
    assert time.monotonic() - started < decode_s
    assert in_thread.rows == 2048


def test_uncompressed_pixels_stay_in_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process hop where there is nothing to decode: native pixel data never reaches the pool."""
    import service.imaging.decode_pool as decode_pool

    def refuse(*_: object) -> None:
        raise AssertionError("native pixel data went to the decode pool")

    monkeypatch.setattr(decode_pool, "shared_pool", refuse)
    ds = dataset()
    np.testing.assert_array_equal(decode_pixels(ds, timeout_s=1.0).stored, decode_here(ds).stored)


def test_the_edge_and_the_dicom_intake_decode_under_the_limit() -> None:
    """Both reach read_radiograph through Flow.run with the policy built from the settings."""
    from service.cascade.flow import Flow
    from service.models.model_set import resolve
    from service.settings import load_settings

    settings = load_settings(environ={"PTX_DECODE_TIMEOUT_S": "3.5", "PTX_DECODE_MEMORY_MB": "1024",
                                      "PTX_DECODE_THREADS": "3"})
    policy = Flow.from_settings(settings, resolve(settings)).policy
    assert (policy.decode_timeout_s, policy.decode_memory_mb, policy.decode_workers) == (3.5, 1024, 3)
    off = load_settings(environ={"PTX_DECODE_TIMEOUT_S": "0"})
    assert Flow.from_settings(off, resolve(off)).policy.decode_timeout_s is None


def test_prestarted_workers_answer_the_first_decode_without_a_start_up(realdata: Path) -> None:
    pool = DecodePool(size=2, timeout_s=30, decode=decode_here)
    try:
        pool.prestart()
        assert pool._idle.qsize() == 2  # noqa: SLF001
        for worker in list(pool._idle.queue):  # noqa: SLF001
            worker.wait_ready(60)
        pids = {worker.process.pid for worker in pool._idle.queue}  # noqa: SLF001
        ds = pydicom.dcmread(realdata / "chest/siim_cr_jpegbaseline_mono2.dcm")
        np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)
        assert pool._started == 2 and {w.process.pid for w in pool._idle.queue} == pids  # noqa: SLF001 -- no new one
    finally:
        pool.close()


def test_a_caller_waiting_for_the_only_worker_gets_its_replacement() -> None:
    """One worker, stuck: a second caller waits, and decodes on the replacement as soon as the first is cut off."""
    pool = DecodePool(size=1, timeout_s=TIMEOUT_S, memory_mb=512, decode=misbehaving)
    try:
        pool.decode(dataset())
        stuck = threading.Thread(target=lambda: pytest.raises(RadiographError, pool.decode, marked(SLOW)))
        stuck.start()
        time.sleep(0.3)
        started = time.monotonic()
        ds = dataset()
        np.testing.assert_array_equal(pool.decode(ds).stored, decode_here(ds).stored)
        assert time.monotonic() - started < TIMEOUT_S + 10
        stuck.join(timeout=30)
        assert pool.replaced == 1 and pool._started == 1  # noqa: SLF001
    finally:
        pool.close()
