"""Headless Chromium for the browser tests (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"]  # fmt: skip
# The README's screenshots are taken by the browser tests when this is set to 1, so that
# ordinary runs leave the working tree alone: EMAILQ_SCREENSHOTS=1 pytest tests/e2e -k browser
SCREENSHOTS_ENV = "EMAILQ_SCREENSHOTS"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


@contextmanager
def chromium(profile: Path, *, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium under selenium (skips the test without one); quit at the end."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            f"no headless browser: needs Debian's chromium and chromium-driver "
            f"({CHROMIUM}, {CHROMEDRIVER}); apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path | None:
    """Save the page as ``docs/img/<name>.png`` for the README, if EMAILQ_SCREENSHOTS=1."""
    if os.environ.get(SCREENSHOTS_ENV) != "1":
        return None
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    path = DOCS_IMG / f"{name}.png"
    # The whole page, not only the window: grow the window to the document's height.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(int(height) + 140, 2400))
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path
