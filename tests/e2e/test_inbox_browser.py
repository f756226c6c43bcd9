"""The dev inbox in a real headless Chromium: a mail sent through the API, a worker and the
capture server (as `make dev` runs them) is listed, its Bcc shown from the envelope, and its
HTML part rendered inside the sandboxed frame, where its script does not run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emailq.devtools.capture import BoundController, CaptureHandler
from emailq.settings import Settings
from tests.helpers.api import mail
from tests.helpers.browser import chromium, screenshot, texts
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs

HTML = ('<div style="font-family:sans-serif"><h2 id="greeting">Welcome back, Grace!</h2>'
        '<p>Your code is <b id="code">493817</b>.</p>'
        "<script>document.write('<p id=\"ran\">the script ran</p>')</script></div>")  # fmt: skip


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "chromium-profile", height=860) as driver:
        yield driver


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The dev capture server on port 0, saving into a folder of the test's."""
    folder = tmp_path / "mail"
    controller = BoundController(CaptureHandler(folder), hostname="127.0.0.1", port=0)
    controller.start()
    yield controller.port, folder
    controller.stop()


def test_inbox_shows_a_sent_mail_with_bcc_and_its_html_part_sandboxed(
    browser: Any, procs: Procs, make_settings: Callable[..., Settings],
    capture: tuple[int, Path],
) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    port, folder = capture
    settings = make_settings(smtp_port=port, dev_pages=True, dev_inbox_dir=folder)
    base = procs.api(settings)
    procs.worker(settings)
    coded = {"html": HTML, "cc": ["audit@example.com"], "bcc": ["secret-audit@example.com"]}
    for subject, extra in (("Welcome aboard", {}), ("Your sign-in code", coded)):
        answer = httpx.post(f"{base}/api/v1/email/received", timeout=5,
                            json=mail(to="grace@example.com", subject=subject, body="Code: 493817",
                                      **extra))  # fmt: skip
        assert answer.status_code == 202, answer.text
    wait_until(lambda: len(list(folder.glob("*.eml"))) == 2, what="2 captured mails")

    browser.get(f"{base}/dev/inbox")
    item = "#list li[data-id] .subject"
    newest_first = ["Your sign-in code", "Welcome aboard"]
    wait_until(lambda: texts(browser, item) == newest_first, what="the list, newest first")
    browser.find_elements(By.CSS_SELECTOR, "#list li[data-id]")[0].click()
    wait_until(lambda: browser.find_element(By.ID, "subject").text == "Your sign-in code",
               what="the mail opened")  # fmt: skip
    bcc = browser.find_element(By.CSS_SELECTOR, '#envelope dd[data-field="bcc"]').text
    assert bcc == "secret-audit@example.com"

    frame = browser.find_element(By.ID, "html-frame")
    assert frame.get_attribute("sandbox") == ""  # no allow-scripts, no allow-same-origin
    browser.switch_to.frame(frame)
    try:
        wait_until(lambda: bool(browser.find_elements(By.ID, "code")), what="the HTML part")
        assert browser.find_element(By.ID, "code").text == "493817"
        assert browser.find_element(By.ID, "greeting").text == "Welcome back, Grace!"
        assert browser.find_elements(By.ID, "ran") == []  # the mail's script did not run
    finally:
        browser.switch_to.default_content()
    screenshot(browser, "inbox")

    # Search narrows the list; the text part is there too.
    browser.find_element(By.ID, "search").send_keys("welcome")
    wait_until(lambda: texts(browser, item) == ["Welcome aboard"], what="the search")
    browser.find_element(By.CSS_SELECTOR, '.tabs button[data-tab="text"]').click()
    assert "Code: 493817" in browser.find_element(By.ID, "tab-text").text
