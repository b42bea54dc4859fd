"""How long a film takes from C-STORE received to its HL7 ORU^R01 acknowledged by the RIS (issue 14 §5, §6).

    python load_tests/notify_latency.py [--films 30] [--gap-s 1.0] [--size 512]

Starts the real service (`bentoml serve`, a token, the DICOM listener on a free loopback port, SQLite in a
temporary folder) with PTX_NOTIFY_HL7 pointing at a RIS started here (hl7apy's MLLP server, the one the tests
use: tests/pacs/test_notifications.py) and every priority notified (PTX_NOTIFY_PRIORITIES=STAT,URGENT,ROUTINE:
a ROUTINE film takes the same path, so every film is measured). Then, one film at a time, `storescu` sends a
synthetic film (each its own study); the latency is the moment the RIS made its ACK (its clock) minus the
instance's `received_at` in the store (the listener's clock, the same machine): C-STORE received → spool →
triage → finding recorded → outbox → MLLP → ACK. Also printed: the triage part (the finding's `created_at`
minus `received_at`) and the rest (outbox to ACK). A slow command by design (about `films × (gap + 1 s)`
after the service's start), not a test.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pydicom

from load_tests.pacs_latency import api, send, spread
from tests.pacs.test_notifications import Ris
from tests.servers import bento_server, free_port, wait_port
from training.__main__ import main as training_main

TOKEN = "notify-latency-" + "9c3d" * 8
STUDY_UID_OBX = "|110180^Study Instance UID^DCM||"


def acked_studies(ris: Ris) -> dict[str, float]:
    """Study Instance UID → when the RIS acknowledged its ORU^R01 (the UID from the message's OBX)."""
    acked = {}
    for message in list(ris.received):
        segments = message.split("\r")
        control_id = segments[0].split("|")[9]
        study = next((s.split(STUDY_UID_OBX, 1)[1].split("|", 1)[0] for s in segments if STUDY_UID_OBX in s), None)
        if study is not None and control_id in ris.acked_at:
            acked[study] = ris.acked_at[control_id]
    return acked


def measure(base: str, dicom_port: int, ris: Ris, films: list[Path], gap_s: float) -> list[tuple[float, float]]:
    """(received → ACK, received → finding recorded) per film."""
    results = []
    for path in films:
        study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        send(dicom_port, path)
        deadline = time.monotonic() + 60
        while study not in (acked := acked_studies(ris)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if study not in acked:
            raise RuntimeError(f"no HL7 message for study …{study[-12:]} acknowledged within 60 s")
        record = api(base, f"/v1/studies/{study}", TOKEN)
        received = datetime.fromisoformat(record["instances"][0]["received_at"]).timestamp()
        created = datetime.fromisoformat(record["findings"][0]["created_at"]).timestamp()
        results.append((acked[study] - received, created - received))
        time.sleep(gap_s * random.uniform(0.5, 1.5))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=30, help="films to send, one at a time (default 30)")
    parser.add_argument("--gap-s", type=float, default=1.0,
                        help="mean pause after each film's ACK (drawn from 0.5 to 1.5 times it)")
    parser.add_argument("--size", type=int, default=512, help="synthetic film side in pixels")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ptx-notify-latency-") as folder:
        work = Path(folder)
        assert training_main(["synth", "--out", str(work / "synth"), "--count", str(args.films), "--seed", "15",
                              "--prevalence", "0.5", "--size", str(args.size), "--uncompressed", "--quiet"]) == 0
        films = sorted((work / "synth" / "dicom").glob("*.dcm"))
        tokens = work / "tokens"
        tokens.write_text(TOKEN + "\n")
        tokens.chmod(0o600)
        dicom_port = free_port()
        with Ris() as ris:
            env = {"PTX_DATA_DIR": str(work / "data"), "PTX_API_TOKEN_FILE": str(tokens),
                   "PTX_DICOM_PORT": str(dicom_port), "PTX_DICOM_HOST": "127.0.0.1",
                   "PTX_NOTIFY_HL7": str(ris.address), "PTX_NOTIFY_PRIORITIES": "STAT,URGENT,ROUTINE"}
            with bento_server(work / "server.log", env=env) as base:
                wait_port(dicom_port, timeout_s=60)
                results = measure(base, dicom_port, ris, films, args.gap_s)
    acked = [a for a, _ in results]
    triage = [t for _, t in results]
    rest = [a - t for a, t in results]
    print(f"{len(results)} films, one at a time: C-STORE received → HL7 ORU^R01 acknowledged by the RIS")
    print(f"  ACK:             {spread(acked)}")
    print(f"  finding stored:  {spread(triage)}   (triage)")
    print(f"  stored → ACK:    {spread(rest, 3)}   (outbox, message, MLLP)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
