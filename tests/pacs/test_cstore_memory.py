"""Issue 13 §8: ten concurrent large C-STOREs must not take the listener's memory with them.

A real listener process (`python -m service.pacs.listener`) receives ten ~60 MB CR datasets (571 MB in all)
at once from ten dcmtk `storescu` processes. The kernel's high-water mark of the listener's resident memory
(VmHWM) is read before and after: the bound is on its growth, `GROWTH_BOUND`, so the interpreter's own size
(~90 MB here) does not matter. Measured: with datasets written to disk as their PDUs arrive the peak was
114-118 MB from 92 MB idle (+22 to +26 MB); when pynetdicom assembled each dataset in memory and the
handler joined it into a second copy, 1021 MB from 92 MB (+929 MB).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicom_factory import dataset
from tests.pacs.test_dicom_listener import STORESCU, start_listener_process

pytestmark = pytest.mark.skipif(not os.access(STORESCU, os.X_OK), reason="dcmtk's storescu is needed")

SENDERS = 10
SIDE = 5472  # 5472 × 5472 × 16 bits: 59.9 MB of pixel data per dataset
GROWTH_BOUND = 100 * 1024 * 1024  # bytes of resident memory over idle: under two of the ten datasets


def high_water_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes: the kernel's own maximum, so no
    sampling can miss a short peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def large_films(folder: Path) -> list[Path]:
    """`SENDERS` Part 10 files of one large pixel array, each its own study and SOP Instance UID."""
    pixels = np.zeros((SIDE, SIDE), dtype=np.uint16)
    pixels[::97, :] = 4000  # not all one value, so a lost fragment would show in the digest
    film = dataset(pixels)
    paths = []
    for index in range(SENDERS):
        film.SOPInstanceUID = film.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        film.StudyInstanceUID = generate_uid()
        path = folder / f"large{index}.dcm"
        film.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_ten_concurrent_large_cstores_keep_the_listeners_memory_bounded(tmp_path: Path) -> None:
    paths = large_films(tmp_path)
    data_dir = tmp_path / "data"
    process, port = start_listener_process(data_dir, tmp_path / "listener.log")
    try:
        idle = high_water_rss(process.pid)
        senders = [subprocess.Popen([STORESCU, "-aet", f"BIG{index}", "-aec", "PTXTRIAGE", "127.0.0.1", str(port),
                                     str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for index, path in enumerate(paths)]
        failures = [sender.communicate(timeout=300)[1] for sender in senders if sender.wait(timeout=300) != 0]
        peak = high_water_rss(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert failures == [], failures
    for path in paths:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert (data_dir / "spool" / f"{uid}.dcm").stat().st_size >= SIDE * SIDE * 2
        path.unlink()  # 1.2 GB in all: not left for pytest's kept temporary folders
    for spooled in (data_dir / "spool").glob("*.dcm"):
        spooled.unlink()
    received = SENDERS * SIDE * SIDE * 2
    assert peak - idle < GROWTH_BOUND, (f"listener peak RSS {peak / 2**20:.0f} MB (idle {idle / 2**20:.0f} MB) "
                                   f"receiving {received / 2**20:.0f} MB in {SENDERS} C-STOREs")


def test_a_dataset_cut_off_midway_leaves_no_file_behind(tmp_path: Path) -> None:
    """pynetdicom writes the dataset to a temporary file as it arrives and removes it only after our handler
    ran: a C-STORE aborted half-way (here: over the message limit) must not leave its part in the spool's
    `receiving` folder, where the listener has pynetdicom write it."""
    from tests.pacs.test_dicom_listener import receiver, scu
    from tests.pacs.test_dicom_pdu import big_film

    with receiver(tmp_path / "data", max_pdu=16 * 1024, max_message_bytes=1024 * 1024) as rx:
        incoming = rx.spool.receiving
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established
        assert not assoc.send_c_store(big_film())  # ~2 MB: aborted after 1 MB was written to the file
        assoc.join(timeout=5)
        deadline = time.monotonic() + 5
        while list(incoming.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(incoming.iterdir()) == []
        assert not rx.instances()
