"""The dev contact page, submitted by a real headless Chromium, arrives as mail."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emailq.devtools.runner import DEV_FORMS
from emailq.settings import Settings
from tests.helpers.browser import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            f"no headless browser: needs Debian's chromium and chromium-driver "
            f"({CHROMIUM}, {CHROMEDRIVER}); apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_contact_page_submitted_in_chromium_arrives_with_reply_to(
    browser: object, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    forms_file = tmp_path / "forms.toml"
    forms_file.write_text(DEV_FORMS)
    settings = make_settings(forms_file=forms_file, dev_pages=True)
    base = procs.api(settings)
    procs.worker(settings)

    browser.get(f"{base}/dev/contact")
    browser.find_element(By.ID, "name").send_keys("Grace Hopper")
    browser.find_element(By.ID, "email").send_keys("grace@visitor.example")
    browser.find_element(By.ID, "message").send_keys("Hello from a real browser <b>!</b>")
    browser.find_element(By.ID, "send").click()
    wait_until(lambda: browser.current_url == f"{base}/dev/thanks", what="thank-you page")
    assert "Thank you" in browser.find_element(By.ID, "thanks").text

    wait_until(lambda: len(smtp.handler.received) == 1, what="the mail at the SMTP server")
    [mail] = smtp.handler.received
    assert mail.rcpt_tos == ["owner@example.com"]
    assert mail.message["Reply-To"] == "grace@visitor.example"
    assert mail.message["From"] == settings.mail_from
    assert mail.message["Subject"] == "Contact form: Grace Hopper"
    text = mail.message.get_body(("plain",))
    assert text is not None
    assert "Hello from a real browser <b>!</b>" in text.get_content()
