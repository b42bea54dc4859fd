"""The worklist in a real browser (issue 14 §6): headless Chromium, the real service, real C-STOREs.

One `bentoml serve` with a token, its DICOM listener and PTX_VIEWER_URL pointing at a real Orthanc's own
DICOMweb study URL; Orthanc sends films to the service (C-STORE), and dcmtk's `storescu` sends the STAT film.
A person signs in through the form, sees the studies arrive in priority order without reloading, gets the
STAT cue, opens a study and acknowledges it with a verdict (issue 14 §3), which the page then shows. The last
test stops the service with the page still open: the event stream must not hold the shutdown. Timing figures
are load_tests/worklist_live.py's, not these tests'.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from service.cascade.finding import Priority
from tests.browser.chromium import chromium, sign_in, wait_live
from tests.orthanc import orthanc_server
from tests.servers import bento_server, free_port, wait_port
from training.__main__ import main as training_main

TOKEN = "browser-test-token-" + "7c3a" * 6
STORESCU = "/usr/bin/storescu"
RANK = {"STAT": 0, "Urgent": 1, "Routine": 2, "Pending": 2}


def synth(folder: Path, count: int, seed: int, prevalence: float) -> list[Path]:
    """Films at the demo's training size, 1024 px: a film rendered at 512 px keeps its per-pixel noise, which the
    0.2.0 classifier (512 px input, trained on 1024 px films) sees as out of distribution, so it is never STAT."""
    assert training_main(["synth", "--out", str(folder), "--count", str(count), "--seed", str(seed),
                          "--prevalence", str(prevalence), "--uncompressed", "--quiet"]) == 0
    return sorted((folder / "dicom").glob("*.dcm"))


def api(base: str, path: str) -> dict:
    request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("browser")
    films = synth(work / "mixed", 5, 31, 0.5)
    stat_film = synth(work / "positive", 1, 8, 1.0)[0]
    tokens = work / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    listener = free_port()
    started: list[subprocess.Popen] = []
    with orthanc_server(work / "orthanc", {"ptx": ("PTXTRIAGE", "127.0.0.1", listener)}) as pacs:
        env = {"PTX_DATA_DIR": str(work / "data"), "PTX_API_TOKEN_FILE": str(tokens), "PTX_DICOM_PORT": str(listener),
               "PTX_DICOM_HOST": "127.0.0.1", "PTX_STAT_SCORE": "0.5",
               "PTX_VIEWER_URL": f"{pacs.http}/dicom-web/studies/{{study_uid}}/series"}
        with bento_server(work / "service.log", env=env, started=started) as base:
            wait_port(listener, timeout_s=60)
            with chromium(work) as driver:
                yield SimpleNamespace(base=base, pacs=pacs, driver=driver, films=films, stat_film=stat_film,
                                      listener=listener, process=started[0])


def rows(driver) -> list[tuple[str, str]]:
    """(study UID, priority label) of the page's rows, read in one go (htmx may swap them at any moment)."""
    found = driver.execute_script("return Array.from(document.querySelectorAll('#live tr[data-study]'))"
                                  ".map(row => [row.dataset.study, row.dataset.priority]);")
    return [tuple(row) for row in found]


def test_a_wrong_token_is_refused(room: SimpleNamespace) -> None:
    sign_in(room.driver, room.base, "dr.lee", TOKEN[:-1] + "x")
    error = WebDriverWait(room.driver, 15).until(
        expected_conditions.visibility_of_element_located((By.ID, "login-error")))
    assert "not accepted" in error.text and room.driver.current_url.startswith(f"{room.base}/worklist/login")
    assert not any(cookie["name"] == "ptx_session" for cookie in room.driver.get_cookies())
    assert room.driver.find_element(By.ID, "reader").get_attribute("value") == "dr.lee"


def test_c_stores_fill_the_open_page_in_priority_order_with_viewer_links(room: SimpleNamespace) -> None:
    driver = room.driver
    sign_in(driver, room.base, "dr.lee", TOKEN)
    wait_live(driver)
    driver.execute_script("window.__kept = 42;")  # gone if the page reloads
    ids = [room.pacs.post("/instances", path.read_bytes(), "application/dicom")["ID"] for path in room.films]
    room.pacs.post("/modalities/ptx/store", {"Resources": ids, "Synchronous": True})  # Orthanc's C-STOREs
    studies = {str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) for path in room.films}
    WebDriverWait(driver, 90, poll_frequency=0.2).until(
        lambda d: {uid for uid, priority in rows(d) if priority != "Pending"} == studies)
    shown = rows(driver)
    assert driver.execute_script("return window.__kept;") == 42
    assert [RANK[priority] for _, priority in shown] == sorted(RANK[priority] for _, priority in shown)
    assert [uid for uid, _ in shown] == [i["study_uid"] for i in api(room.base, "/v1/worklist")["items"]]
    link = driver.find_element(By.CSS_SELECTOR, f'tr[data-study="{shown[0][0]}"] a[target="_blank"]')
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:  # Orthanc's own URL
        series = json.loads(response.read())
    assert {s["0020000D"]["Value"][0] for s in series} == {shown[0][0]}  # it resolves to that study


def test_a_new_stat_appears_live_with_its_cue(room: SimpleNamespace) -> None:
    driver = room.driver
    study = str(pydicom.dcmread(room.stat_film, stop_before_pixels=True).StudyInstanceUID)
    sent = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "PTXTRIAGE", "127.0.0.1", str(room.listener),
                           str(room.stat_film)], check=False, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    alert = WebDriverWait(driver, 30, poll_frequency=0.1).until(  # the earlier films may have cued STATs too
        expected_conditions.text_to_be_present_in_element((By.ID, "stat-alert"), study[-14:]))
    alert = driver.find_element(By.ID, "stat-alert")
    assert alert.is_displayed()
    assert api(room.base, f"/v1/studies/{study}")["priority"] == Priority.STAT.value, "the test film is not STAT"
    assert "New STAT study" in alert.text and study[-14:] in alert.text
    shown = rows(driver)
    place = shown.index((study, "STAT"))  # among the STATs, by arrival: after the earlier ones, before the rest
    assert all(p == "STAT" for _, p in shown[:place]) and all(p != "STAT" for _, p in shown[place + 1:])
    assert driver.execute_script("return window.__kept;") == 42
    assert driver.find_element(By.ID, "sound").get_attribute("aria-pressed") == "true"
    driver.find_element(By.ID, "sound").click()  # the reader switches the sound off; it stays off
    assert driver.execute_script("return localStorage.getItem('ptx-sound');") == "off"


def test_the_study_view_shows_the_overlay_and_takes_the_acknowledgement_with_a_verdict(room: SimpleNamespace) -> None:
    """The reader acknowledges the first STAT with the verdict "disagree" (issue 14 §3): it posts, the page
    shows it in the study's feedback, and the API has it with the acknowledgement."""
    driver = room.driver
    top, priority = rows(driver)[0]  # the first STAT
    driver.find_element(By.CSS_SELECTOR, f'tr[data-study="{top}"] a.study-link').click()
    image = WebDriverWait(driver, 15).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "figure.overlay img")))
    WebDriverWait(driver, 15).until(lambda d: d.execute_script("return arguments[0].naturalWidth;", image) > 0)
    form = driver.find_element(By.CSS_SELECTOR, "#feedback form.verdict-form")
    form.find_element(By.CSS_SELECTOR, "input[name=verdict][value=disagree]").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    notice = WebDriverWait(driver, 15).until(expected_conditions.visibility_of_element_located((By.CLASS_NAME,
                                                                                               "notice")))
    assert "Acknowledged" in notice.text and "your verdict: Disagree" in notice.text
    shown = driver.find_element(By.CSS_SELECTOR, '#feedback tr[data-reader="dr.lee"]')
    assert shown.get_attribute("data-verdict") == "disagree" and "Disagree" in shown.text
    assert driver.find_element(By.CSS_SELECTOR, "#feedback input[value=disagree]").is_selected()
    study = api(room.base, f"/v1/studies/{top}")
    assert (study["status"], study["priority"]) == ("reviewed", priority.upper())
    assert [(f["reader"], f["verdict"], f["priority"]) for f in study["feedback"]] == [
        ("dr.lee", "disagree", priority.upper())]
    assert api(room.base, "/v1/worklist?status=reviewed")["items"][0]["study_uid"] == top


def test_stopping_the_service_ends_the_open_page_s_stream(room: SimpleNamespace) -> None:
    """Last: it stops the server. Without the signal hook (service/http/pages/live.py) uvicorn waits for the
    open event stream and the service is only killed at stop_group's grace (20 s)."""
    import os
    import signal

    sign_in(room.driver, room.base, "dr.lee", TOKEN)  # again: this test may run alone
    wait_live(room.driver)
    os.killpg(room.process.pid, signal.SIGTERM)
    room.process.wait(timeout=15)
