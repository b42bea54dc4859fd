"""Decode functions for the decode pool's tests: importable by name, since the pool's worker processes
start from a forkserver and unpickle the function they run. Each misbehaves only on a marked dataset
(Pixel Data starting with a marker) and decodes anything else for real, so one pool shows both."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from pydicom.dataset import Dataset

from service.imaging.decoding import decode_here

SLOW, HUNGRY, CRASH = b"SLOW", b"HUNGRY", b"CRASH"


def misbehaving(ds: Dataset) -> np.ndarray:
    data = bytes(ds.PixelData[:8])
    if data.startswith(SLOW):
        time.sleep(120)  # a decoder stuck in C code: the pool must not wait for it
    elif data.startswith(HUNGRY):
        hoard = bytearray(8 * 1024**3)  # more than the worker's address-space cap
        return np.frombuffer(hoard, dtype=np.uint8)
    elif data.startswith(CRASH):
        os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug does
    return decode_here(ds)
