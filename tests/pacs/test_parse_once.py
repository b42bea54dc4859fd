"""The C-STORE path reads each film once: one parse and one pixel decode from receipt to SEG/SR/SC.

The whole PACS side (`Pacs`: listener, spool, intake, result writers) runs in-process with the service's
flow (`InProcessTriage`), real C-STOREs from pynetdicom; the test counts the calls of the reader's parser,
of the decoder (wherever it is called from) and of the result writers' fallback parse.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from service.imaging import reader
from service.pacs import side
from service.pacs.results import overlay
from service.settings import load_settings
from service.store import InstanceStatus, open_store
from service.store.results_files import ResultsFolder
from tests.pacs.test_dicom_listener import InProcessTriage
from tests.servers import free_port

FILMS = ("siim_cr_jpegbaseline_mono2.dcm", "philips_cr_j2k_lossy_mono1.dcm")


def send(port: int, paths: list[Path]) -> list[int]:
    return send_datasets(port, [pydicom.dcmread(path) for path in paths])


def send_datasets(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE each dataset in its own transfer syntax over one association to PTXTRIAGE; the statuses."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_one_parse_and_one_decode_per_film_from_receipt_to_results(tmp_path: Path, realdata: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"parse": 0, "decode": 0, "fallback parse": 0}

    def counted(name: str, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(reader, "parse_dicom", counted("parse", reader.parse_dicom))
    monkeypatch.setattr(reader, "decode_pixels", counted("decode", reader.decode_pixels))
    monkeypatch.setattr(overlay, "decode_pixels", counted("decode", overlay.decode_pixels))
    monkeypatch.setattr(side, "dcmread", counted("fallback parse", side.dcmread))
    paths = [realdata / "chest" / name for name in FILMS]
    port = free_port()
    settings = load_settings(environ={"PTX_DICOM_PORT": str(port), "PTX_DICOM_HOST": "127.0.0.1",
                                      "PTX_DATA_DIR": str(tmp_path), "PTX_RETENTION_DAYS": "0"})

    async def scenario() -> list[Path]:
        with open_store(None, tmp_path) as store:
            results = ResultsFolder(tmp_path / "results")
            pacs = side.Pacs(settings, store, results, InProcessTriage())
            await pacs.start()
            try:
                statuses = await asyncio.to_thread(send, port, paths)
                assert statuses == [0, 0]
                deadline = time.monotonic() + 120
                uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]
                while time.monotonic() < deadline:
                    records = [store.instance(uid) for uid in uids]
                    if all(r is not None and r.status is InstanceStatus.DONE for r in records) and \
                            not any(pacs.spool.exists(uid) for uid in uids):
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"not all films were triaged and written in time: {records}")
                return [path for path in (tmp_path / "results").rglob("*.dcm")]
            finally:
                await pacs.stop()

    written = asyncio.run(scenario())
    kinds = sorted(path.name for path in written)
    assert kinds.count("SR.dcm") == len(FILMS) and kinds.count("SC.dcm") == len(FILMS)
    assert calls == {"parse": len(FILMS), "decode": len(FILMS), "fallback parse": 0}
