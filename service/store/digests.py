"""The one definition of an instance's digest (`ReceivedInstance.sha256`): SHA-256 of the data set as the
sender encoded it, without the preamble and file meta group.

Why without the file meta group: it names the sender and is rewritten on receipt, so one film sent by two
senders, or over C-STORE and over HTTP (PTX_RECORD_HTTP), must still be one digest; the data set is what the
sender encoded. The listener hashes received files (in 1 MiB reads), HTTP recording hashes bytes: both skip
the same bytes, found by `dataset_offset`, so the SOP UID conflict rule (issue 13 §3) compares like with like.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import data_element_generator, read_preamble


def dataset_offset(stream: BinaryIO) -> int:
    """Where the data set starts in a DICOM stream read from its start (bytes or an open file), the stream left
    there: past the preamble and the file meta group, walked with pydicom (its group length may be absent)."""
    read_preamble(stream, force=True)  # past "DICM", or back at 0 when there is no preamble
    start = stream.tell()
    if start == 0 and stream.read(2) != b"\x02\x00":
        stream.seek(0)
        return 0  # no file meta group at all: a bare data set
    stream.seek(start)
    for _ in data_element_generator(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
        pass  # the generator stops before, and rewinds to, the first element after group 0002
    return stream.tell()


def dataset_sha256(data: bytes) -> str:
    """The digest (hex) of DICOM bytes; bytes without a preamble are hashed from their first element of
    another group than 0002."""
    return hashlib.sha256(memoryview(data)[dataset_offset(io.BytesIO(data)):]).hexdigest()


def file_dataset_sha256(path: Path) -> str:
    """The digest (hex) of a DICOM file (a received or spooled film), read in 1 MiB pieces, never whole;
    FileNotFoundError when the file is gone."""
    with path.open("rb") as handle:
        dataset_offset(handle)
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
