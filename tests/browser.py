"""Headless Debian chromium for tests that drive a page as a user would (selenium + chromium-driver).

``make test`` installs the Debian packages ``chromium`` and ``chromium-driver`` when they are missing; a test that
needs them fails, naming the package, where they are absent (a skip would hide a missing install step).
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def require_chromium() -> None:
    """Fail the calling test, naming what to install, unless selenium, chromium and chromedriver are all present."""
    importlib.import_module("selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            pytest.fail(f"{path} not installed (apt-get install chromium chromium-driver; make test does it)")


@contextlib.contextmanager
def headless_chromium(width: int = 1000, height: int = 800) -> Iterator:
    """A selenium webdriver on headless chromium with a ``width`` x ``height`` window; quit on exit."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    # Keep the page's console messages, so tests can read them with driver.get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
