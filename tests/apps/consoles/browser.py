"""Headless Chromium driven by Selenium through Debian's chromium-driver, for the console page's tests.

Chromium is Debian's (no browser or driver is downloaded: Selenium is told both paths). A test signs
a user in by giving the browser that user's session cookie (:func:`sign_in`).
"""

import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Headless Chromium as every browser test here runs it (plus a profile directory of its own).
HEADLESS_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        options.binary_location = CHROMIUM
        for argument in (*HEADLESS_ARGS, f"--user-data-dir={profile}"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def sign_in(driver: WebDriver, base_url: str, user: Any) -> None:
    """The browser holds ``user``'s session (a cookie is set on a page of the site: its health probe)."""
    client = Client()
    client.force_login(user)
    driver.get(f"{base_url}/healthz")
    driver.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value, "path": "/"})


def wait_until(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float, what: str) -> Any:
    """What ``condition`` returns once it is true; an error naming ``what`` (and the page) after ``timeout``."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except Exception as error:
        state = driver.execute_script("return document.body && document.body.innerText")
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what}; the page says: {state}"
        ) from error


def terminal_text(driver: WebDriver) -> str:
    """The console page's terminal buffer as text."""
    return str(driver.execute_script("return window.novacronConsole ? window.novacronConsole.text() : ''"))
