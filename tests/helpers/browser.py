"""Headless Chromium for the browser tests (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.polling import wait_until

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


def text_of(browser: Any, css: str) -> str:
    """The text of the first element matching ``css``, or "" while there is none (or it
    was just replaced: the page re-renders its tables as updates arrive)."""
    found = texts(browser, css)
    return found[0] if found else ""


def texts(browser: Any, css: str) -> list[str]:
    """The text of every element matching ``css`` ([] if they were replaced meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return [str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, css)]
    except StaleElementReferenceException:
        return []


def click(browser: Any, css: str) -> None:
    """Click the element matching ``css``, again if a re-render replaced it first."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
        except (StaleElementReferenceException, NoSuchElementException,
                ElementClickInterceptedException):  # fmt: skip
            return False
        return True

    wait_until(clicked, what=f"a click on {css}")


def lookup_until(browser: Any, status: str, *, every: float = 2.0) -> None:
    """Submit the dashboard's task lookup until it shows ``status``: a live update landing
    while the first answer renders (a busy machine) may leave the old one showing."""
    last = 0.0

    def shown() -> bool:
        nonlocal last
        if text_of(browser, "#task-status") == status:
            return True
        if time.monotonic() - last > every:
            last = time.monotonic()
            click(browser, "#lookup-form button")
        return False

    wait_until(shown, what=f"the task lookup showing {status}", timeout=60)
