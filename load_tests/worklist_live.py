"""How long a film takes from C-STORE to its row on an open worklist page (issue 14 §6), p50/p95.

    python load_tests/worklist_live.py [--films 30] [--gap-s 1.0] [--screenshots docs/screenshots]

With --screenshots, eight more films go first (not measured) and the worklist and a study view are saved
there at 1280×800 (the pictures in docs/reading-room.md).

Starts the real service (`bentoml serve`, a token, the DICOM listener on a free loopback port, SQLite in a
temporary folder), signs a headless Chromium in through the sign-in form and opens the worklist filtered to
triaged studies. Then, one film at a time, `storescu` sends a synthetic film; a MutationObserver in the page
notes when the film's study row appears with its priority (after the event stream said "change" and htmx
fetched the rows). The latency is that moment (the browser's clock) minus the instance's `received_at` in the
store (the listener's clock, the same machine): C-STORE received → triage → store → poll → event → fetch →
row. Each study is acknowledged once seen, so the filtered page never holds more than one page of rows.
Also printed: the triage part alone (the finding's `created_at` minus `received_at`), to tell the service's
work from the page's. A slow command by design (about `films × (gap + 1 s)`), not a test.
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
from selenium.webdriver.remote.webdriver import WebDriver

from load_tests.pacs_latency import api, send, spread
from tests.browser.chromium import chromium, sign_in, wait_live
from tests.servers import bento_server, free_port, wait_port
from training.__main__ import main as training_main

TOKEN = "worklist-live-" + "5e1f" * 8
SHOT_FILMS = 8  # sent first, for the screenshots, when asked for (not measured)
OBSERVER = """
window.__seen = window.__seen || {};
const note = () => document.querySelectorAll('#live tr[data-study]').forEach(row => {
  if (row.dataset.priority !== 'Pending' && !(row.dataset.study in window.__seen)) {
    window.__seen[row.dataset.study] = Date.now();
  }
});
new MutationObserver(note).observe(document.getElementById('live'), {childList: true, subtree: true});
note();
"""


def study_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def screenshots(driver: WebDriver, base: str, dicom_port: int, films: list[Path], folder: Path) -> None:
    """The worklist (1280×800) with these films on it, and the study view of the one on top; then every
    study acknowledged, so the measurement starts on an empty triaged list."""
    for path in films:
        send(dicom_port, path)
    studies = {study_uid_of(path) for path in films}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = api(base, "/v1/worklist?limit=100", TOKEN)["items"]
        if sum(i["status"] == "triaged" for i in items) == len(studies):
            break
        time.sleep(0.5)
    folder.mkdir(parents=True, exist_ok=True)
    driver.get(f"{base}/worklist/")
    wait_live(driver)
    time.sleep(2.5)  # the thumbnails load lazily, an overlay still being written a moment later
    driver.save_screenshot(str(folder / "worklist.png"))
    driver.get(f"{base}/worklist/studies/{items[0]['study_uid']}")
    time.sleep(1.0)
    driver.save_screenshot(str(folder / "study.png"))
    for item in items:
        api(base, f"/v1/studies/{item['study_uid']}/ack?by=load-test&priority={item['priority']}", TOKEN, method="POST")


def measure(base: str, dicom_port: int, films: list[Path], gap_s: float, work: Path,
            shots: Path | None) -> tuple[list[float], list[float]]:
    seen_after, triage_after = [], []
    with chromium(work) as driver:
        sign_in(driver, base, "load-test", TOKEN)
        if shots is not None:
            films, extra = films[SHOT_FILMS:], films[:SHOT_FILMS]
            screenshots(driver, base, dicom_port, extra, shots)
        driver.get(f"{base}/worklist/?status=triaged")
        wait_live(driver)
        driver.execute_script(OBSERVER)
        for path in films:
            study = study_uid_of(path)
            send(dicom_port, path)
            deadline = time.monotonic() + 30
            seen_ms = None
            while seen_ms is None and time.monotonic() < deadline:
                seen_ms = driver.execute_script("return window.__seen[arguments[0]] || null;", study)
                if seen_ms is None:
                    time.sleep(0.02)
            if seen_ms is None:
                raise RuntimeError(f"study …{study[-12:]} never appeared on the page within 30 s")
            record = api(base, f"/v1/studies/{study}", TOKEN)
            received = datetime.fromisoformat(record["instances"][0]["received_at"]).timestamp()
            created = datetime.fromisoformat(record["findings"][0]["created_at"]).timestamp()
            seen_after.append(seen_ms / 1000 - received)
            triage_after.append(created - received)
            api(base, f"/v1/studies/{study}/ack?by=load-test&priority={record['priority']}", TOKEN, method="POST")
            time.sleep(gap_s * random.uniform(0.5, 1.5))  # no fixed phase against the page's poll
    return seen_after, triage_after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=30, help="films to send, one at a time (default 30)")
    parser.add_argument("--gap-s", type=float, default=1.0,
                        help="mean pause after each film's row appeared (drawn from 0.5 to 1.5 times it)")
    parser.add_argument("--size", type=int, default=512, help="synthetic film side in pixels")
    parser.add_argument("--screenshots", type=Path, help="also save worklist.png and study.png here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ptx-worklist-live-") as folder:
        work = Path(folder)
        count = args.films + (SHOT_FILMS if args.screenshots else 0)
        assert training_main(["synth", "--out", str(work / "synth"), "--count", str(count), "--seed", "14",
                              "--prevalence", "0.5", "--size", str(args.size), "--uncompressed", "--quiet"]) == 0
        films = sorted((work / "synth" / "dicom").glob("*.dcm"))
        tokens = work / "tokens"
        tokens.write_text(TOKEN + "\n")
        tokens.chmod(0o600)
        dicom_port = free_port()
        env = {"PTX_DATA_DIR": str(work / "data"), "PTX_API_TOKEN_FILE": str(tokens),
               "PTX_DICOM_PORT": str(dicom_port), "PTX_DICOM_HOST": "127.0.0.1", "PTX_AUTH_OPEN_HEALTH": "true",
               "PTX_VIEWER_URL": "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}"}
        with bento_server(work / "server.log", env=env) as base:
            wait_port(dicom_port, timeout_s=60)
            seen, triage = measure(base, dicom_port, films, args.gap_s, work, args.screenshots)
    print(f"{len(seen)} films, one at a time: C-STORE received → row visible on the open worklist page")
    print(f"  row visible:   {spread(seen)}")
    print(f"  triage stored: {spread(triage)}   (the service's part)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
