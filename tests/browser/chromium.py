"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`), driven by Selenium.

Started with a fresh profile in a temporary folder and without anything that reaches the internet on its own
(component updates, sync, background networking, QUIC), so a test sees only our server. Stopped by PID: the
driver's `quit()` first, then whatever is left below chromedriver's process (a crashed browser's helpers).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required")


def require_chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        raise RuntimeError("headless Chromium is needed: apt-get install chromium chromium-driver (.ci/run installs "
                           "them)")


@contextlib.contextmanager
def chromium(log_dir: Path, width: int = 1280, height: int = 800) -> Iterator[WebDriver]:
    """A headless Chromium window of `width`×`height`, its driver's log in `log_dir`."""
    require_chromium()
    profile = tempfile.mkdtemp(prefix="ptx-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(log_dir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver_pid = service.process.pid if service.process is not None else None
    try:
        yield driver
    finally:
        below = psutil.Process(driver_pid).children(recursive=True) if driver_pid else []
        with contextlib.suppress(Exception):  # a dead browser: the PIDs below still go
            driver.quit()
        for process in below:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(below, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(driver: WebDriver, base: str, login: str, token: str, timeout_s: float = 15) -> None:
    """Through the sign-in form (the one the worklist redirects a person to; opened directly, so that signing in
    again, as another reader, works too)."""
    driver.get(f"{base}/worklist/login?next=%2Fworklist%2F")
    WebDriverWait(driver, timeout_s).until(expected_conditions.presence_of_element_located((By.ID, "token")))
    driver.find_element(By.ID, "reader").send_keys(login)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()


def wait_live(driver: WebDriver, timeout_s: float = 15) -> None:
    """Until the worklist's event stream is open (its status line says so)."""
    WebDriverWait(driver, timeout_s).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "live-state"), "Live:"))
