"""The web page in headless Chromium against `scaletune up`: progress changes live, without a reload, to completion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,2000"]
INSTALL_HINT = ("headless Chromium and its driver are needed for the web page test; install them with "
                "`apt-get install -y chromium chromium-driver` (Debian) and make sure `chromium` and "
                "`chromedriver` are on PATH")
STUDY_TIMEOUT_S = 300
N_TRIALS = 4
SPEC: dict[str, Any] = {
    "name": "web-e2e", "kind": "tune",
    "model": {"family": "mlp", "base": {"width": 64, "depth": 2}, "proxy": {"width": 64, "depth": 2}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 150, "batch_size": 32, "eval_every": 25},
    "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
    "n_trials": N_TRIALS, "parallelism": 1, "sampler": {"name": "random", "seed": 0},
}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(INSTALL_HINT)
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


@pytest.fixture
def token(embedded_service: str, embedded_home: Path) -> str:
    """An API token in the embedded service's database, as a user gets one from `scaletune token create`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SCALETUNE_")}
    created = subprocess.run([sys.executable, "-m", "service.cli", "token", "create", "--name", "web-e2e"],
                             capture_output=True, text=True, env={**env, "SCALETUNE_HOME": str(embedded_home)},
                             timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    return created.stdout.strip().splitlines()[-1]


# The page re-renders as events arrive: every read of live state is one script call (one consistent snapshot,
# no element handle that a re-render can make stale), and every check of live state waits for it.
def _text(browser: WebDriver, selector: str) -> str:
    return str(browser.execute_script("return document.querySelector(arguments[0]).textContent.trim();", selector))


def _texts(browser: WebDriver, *selectors: str) -> tuple[str, ...]:
    return tuple(browser.execute_script(
        "return arguments[0].map((s) => document.querySelector(s).textContent.trim());", list(selectors)))


# Records every progress text the page renders, in order, from now on: a fast study may finish between two
# polls, so polling could miss each change and see only the first and final states.
PROGRESS_RECORDER = """
    const read = () => document.querySelector("#progress-text")?.textContent.trim();
    window.__progressShown = [read()];
    new MutationObserver(() => {
      const text = read(), shown = window.__progressShown;
      if (text !== undefined && shown[shown.length - 1] !== text) shown.push(text);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
    return window.__progressShown[0];
"""


def _column(browser: WebDriver, index: int) -> list[str]:
    return list(browser.execute_script(
        "return [...document.querySelectorAll('#trials-table tbody tr')]"
        ".map((row) => row.cells[arguments[0]].textContent.trim());", index))


@pytest.mark.timeout(STUDY_TIMEOUT_S + 180)
def test_study_page_shows_live_progress_to_completion(embedded_service: str, token: str, browser: WebDriver) -> None:
    study_id = httpx.post(f"{embedded_service}/v1/studies", json=SPEC, headers={"Authorization": f"Bearer {token}"},
                          timeout=30).raise_for_status().json()["id"]

    browser.get(f"{embedded_service}/")
    browser.find_element(By.ID, "token").send_keys(token, Keys.TAB)  # the page keeps it for fetch, SSE and images
    WebDriverWait(browser, 30).until(lambda b: "web-e2e" in _text(b, "#studies-table"))
    browser.find_element(By.LINK_TEXT, "web-e2e").click()
    WebDriverWait(browser, 30).until(lambda b: _text(b, "#study-id") == study_id)
    browser.execute_script("window.__sameDocument = true;")  # lost on any reload or navigation
    first = browser.execute_script(PROGRESS_RECORDER)
    assert first.endswith(f"/{N_TRIALS}"), first

    WebDriverWait(browser, STUDY_TIMEOUT_S, poll_frequency=0.2).until(
        lambda b: _text(b, "#study-status") in ("completed", "failed", "cancelled"))
    assert browser.execute_script("return window.__sameDocument === true;"), "the page reloaded"
    assert _text(browser, "#study-status") == "completed"
    final = ("completed", f"{N_TRIALS}/{N_TRIALS}", "finished")
    WebDriverWait(browser, 30).until(lambda b: _texts(b, "#study-status", "#progress-text", "#live-state") == final)
    shown = browser.execute_script("return window.__progressShown;")
    assert shown[0] == first and shown[-1] == f"{N_TRIALS}/{N_TRIALS}" and len(shown) >= 2, shown

    WebDriverWait(browser, 30).until(lambda b: _column(b, 2) == ["complete"] * N_TRIALS)
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='value']").click()
    values = [float(v) for v in _column(browser, 3)]
    assert values == sorted(values)
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='value']").click()
    assert [float(v) for v in _column(browser, 3)] == sorted(values, reverse=True)

    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return document.querySelector(\"figure[data-kind='history'] img\").naturalWidth") > 0)

    browser.find_element(By.NAME, "width").send_keys("1024")
    browser.find_element(By.NAME, "depth").send_keys("8")
    browser.find_element(By.CSS_SELECTOR, "#transfer-form button").click()
    WebDriverWait(browser, 30).until(lambda b: _text(b, "#transfer-result").startswith("plan downloaded"))
    assert browser.execute_script("return window.__sameDocument === true;")

    Select(browser.find_element(By.NAME, "batch_rule")).select_by_visible_text("sqrt")  # without a batch size
    browser.find_element(By.CSS_SELECTOR, "#transfer-form button").click()
    WebDriverWait(browser, 30).until(lambda b: _text(b, "#transfer-result").startswith(
        "batch_size: batch_rule needs batch_size"))  # the problem's detail, as the server wrote it

    # A fresh page opened on the finished study: from the moment the study shows, nothing claims to connect.
    browser.get(f"{embedded_service}/#/")
    browser.refresh()
    assert _live_state_when_shown(browser, study_id) == "finished"


def _live_state_when_shown(browser: WebDriver, study_id: str) -> str:
    """Open the study from the list and read the live state in the same task that first renders the study."""
    return str(browser.execute_async_script("""
        const [studyId, done] = arguments;
        const observer = new MutationObserver(() => {
          if (document.querySelector("#study-id").textContent !== studyId) return;
          observer.disconnect();
          done(document.querySelector("#live-state").textContent);
        });
        observer.observe(document.body, {subtree: true, childList: true, characterData: true});
        location.hash = `#/study/${studyId}`;
    """, study_id))
