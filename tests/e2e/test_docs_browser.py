"""/docs and /redoc render in a real headless Chromium that can reach nothing but the API on
127.0.0.1: every other request goes to a proxy that is not there, and every request made
is read back from the browser's own network log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emailq.settings import Settings
from tests.helpers.browser import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM
from tests.helpers.polling import wait_until
from tests.helpers.ports import port_of, refused_port
from tests.helpers.processes import Procs

REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture
def offline_browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"no headless browser: needs Debian's chromium and chromium-driver "
                    f"({CHROMIUM}, {CHROMEDRIVER})")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Chromium goes direct to loopback only; anything else is sent to a port nobody listens
    # on, so a CDN reference would fail to load (and show in the log below) here too.
    with refused_port() as dead:  # held, so nobody else listens there meanwhile
        nowhere = f"http://127.0.0.1:{port_of(dead)}"
        for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                     f"--proxy-server={nowhere}"]:  # fmt: skip
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(30)
        yield driver
        driver.quit()


def network_log(driver: object) -> tuple[dict[str, str], dict[str, str]]:
    """From DevTools' network log since the last call: each request's URL, and why the
    browser itself stopped some of them, both by request id."""
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(driver, WebDriver)
    requested, blocked = {}, {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            requested[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked[params["requestId"]] = params["blockedReason"]
    return requested, blocked


@pytest.mark.parametrize(
    ("page", "rendered"),
    [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id^='tag/email']")],
)
def test_docs_render_with_nothing_but_the_api(
    offline_browser: object, procs: Procs, make_settings: Callable[..., Settings],
    page: str, rendered: str,
) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(offline_browser, WebDriver)
    base = procs.api(make_settings())
    network_log(offline_browser)  # the browser's own start-up (its new-tab page)
    offline_browser.get(base + page)
    wait_until(lambda: bool(offline_browser.find_elements(By.CSS_SELECTOR, rendered)),
               what=f"{page} rendering its endpoints", timeout=30)  # fmt: skip
    assert "/api/v1/email/received" in offline_browser.find_element(By.TAG_NAME, "body").text

    requested, blocked = network_log(offline_browser)
    assert f"{base}/openapi.json" in requested.values()
    elsewhere = {rid: url for rid, url in requested.items()
                 if not url.startswith((base + "/", "data:", "blob:"))}  # fmt: skip
    # ReDoc's sidebar always names one image on Redocly's CDN (there is no option to drop
    # it): the pages' Content-Security-Policy stops it inside the browser, so no request
    # leaves. Anything else, or anything not stopped, fails here.
    assert set(elsewhere.values()) <= {REDOCLY_LOGO}, elsewhere
    assert all(blocked.get(rid) == "csp" for rid in elsewhere), (elsewhere, blocked)
    severe = [e["message"] for e in offline_browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [m for m in severe if REDOCLY_LOGO not in m] == []  # no script errors
