"""The dashboard in a real headless Chromium, against the API and a worker as processes: an
admin key is entered, a dead letter and a backlog appear without a reload, and the dead
letter is requeued from its button and sent."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import ADMIN, ALICE, API_KEYS, bearer, mail
from tests.helpers.browser import chromium, click, lookup_until, screenshot, text_of, texts
from tests.helpers.polling import wait_until
from tests.helpers.ports import port_of, refused_port
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer

REFUSAL = "550 5.1.1 <gone@example.com>: mailbox unavailable"
BACKLOG = {"high": 4, "default": 7, "low": 12}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def send(base: str, **fields: Any) -> str:
    response = httpx.post(f"{base}/api/v1/email/received", json=mail(**fields),
                          headers=bearer(ALICE), timeout=5)  # fmt: skip
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_dashboard_shows_a_dead_letter_and_a_backlog_live_and_requeues_it(
    browser: Any, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    from selenium.webdriver.common.by import By

    settings = make_settings(api_keys=API_KEYS, job_lease_seconds=10)
    base = procs.api(settings)
    worker = procs.worker(settings)
    for n in range(3):
        send(base, subject=f"welcome {n}")
    wait_until(lambda: len(smtp.handler.received) == 3, what="3 mails sent")

    browser.get(f"{base}/dashboard")
    wait_until(lambda: browser.find_element(By.ID, "key-form").is_displayed(),
               what="the page to ask for an admin key")  # fmt: skip
    assert text_of(browser, "#message") == "Enter an admin key to open the dashboard."
    browser.find_element(By.ID, "key").send_keys("eq_not-a-key-of-this-api")
    browser.find_element(By.ID, "key-save").click()
    wait_until(lambda: text_of(browser, "#message").startswith("That key was refused: "),
               what="the page to say the key was refused")  # fmt: skip
    browser.find_element(By.ID, "key").send_keys(ADMIN)
    browser.find_element(By.ID, "key-save").click()
    wait_until(lambda: text_of(browser, "#live") == "live", what="the live event stream")
    # What happened before the page opened is shown too: the three mails' sends.
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, '#events tr[data-type="sent"]'))
               == 3, what="the recent events on the page")  # fmt: skip
    assert browser.execute_script("return sessionStorage.getItem('emailq.adminKey')") == ADMIN
    assert ADMIN not in browser.current_url
    # A reload would lose this mark: everything below must arrive on the page as it is.
    browser.execute_script("document.body.dataset.mark = 'no reload'")

    # A dead letter appears, with the relay's refusal as its reason.
    smtp.handler.replies.append(REFUSAL)
    dead = send(base, to="gone@example.com", subject="Your receipt")
    row = f'#dead tr[data-task-id="{dead}"]'
    wait_until(lambda: "550 5.1.1" in text_of(browser, row), what="the dead letter on the page")
    assert "<gone@example.com>" in text_of(browser, row)  # SMTP text shown as text
    assert text_of(browser, '#counters dd[data-counter="dead letters"]') == "1"

    # A backlog appears while the worker is paused (SIGSTOP: it holds nothing, claims nothing).
    worker.send_signal(signal.SIGSTOP)
    try:
        for lane, count in BACKLOG.items():
            for n in range(count):
                send(base, priority=lane, subject=f"{lane} {n}")

        def backlog_shown() -> bool:
            return all(text_of(browser, f'#lanes tr[data-lane="{lane}"] .depth') == str(count)
                       for lane, count in BACKLOG.items())  # fmt: skip

        wait_until(backlog_shown, what="the backlog on the page")
        wait_until(lambda: text_of(browser, "#workers td.num").endswith("ago"),
                   what="the worker's heartbeat age")  # fmt: skip
        click(browser, f"{row} button.link")  # its id opens the task lookup
        wait_until(lambda: text_of(browser, "#task-status") == "failed", what="the lookup")
        screenshot(browser, "dashboard")
    finally:
        worker.send_signal(signal.SIGCONT)

    wait_until(lambda: all(text_of(browser, f'#lanes tr[data-lane="{lane}"] .depth') == "0"
                           for lane in BACKLOG), what="the backlog drained")  # fmt: skip

    # Requeue from the button: the relay takes it now, and the page shows it sent.
    click(browser, f'#dead button.requeue[data-task-id="{dead}"]')
    wait_until(lambda: dead in smtp.handler.task_ids(), what="the requeued mail at the relay")
    wait_until(lambda: text_of(browser, '#dead tbody td') == "none",
               what="the dead letter gone from the page")  # fmt: skip
    sent_row = '#events tr[data-type="sent"] button.link'
    wait_until(lambda: dead in texts(browser, sent_row),
               what="the 'sent' event of the requeued task")  # fmt: skip
    assert browser.execute_script("return document.body.dataset.mark") == "no reload"

    # Its attempt log, by task lookup: the refusal, then the success.
    browser.find_element(By.ID, "lookup-id").clear()
    browser.find_element(By.ID, "lookup-id").send_keys(dead)
    lookup_until(browser, "success")
    # The attempts table renders after the status line (and a live update may redraw it):
    # wait for it rather than read it once.
    wait_until(lambda: "550" in text_of(browser, "#task table.attempts"),
               what="the refusal in the attempt log")  # fmt: skip
    assert "success" in text_of(browser, "#task table.attempts")
    assert sum(1 for r in smtp.handler.received if r.task_id == dead) == 1


def test_read_only_dashboard_shows_no_actions_and_the_api_refuses_them(
    browser: Any,
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp: SmtpServer,
    store: redis.Redis,
) -> None:
    from selenium.webdriver.common.by import By

    settings = make_settings(dashboard_read_only=True)  # zero-config: loopback, no key
    base = procs.api(settings)
    task_id = send_local(base)
    cancel = httpx.post(f"{base}/api/v1/admin/tasks/{task_id}/cancel", timeout=5)
    assert cancel.status_code == 403

    # A worker whose heartbeats stopped a lease ago (stalled, or dead and not yet taken
    # for it): listed, and marked late.
    now_ms = int(store.time()[0]) * 1000
    store.zadd(Keys().workers, {"host:9:stalled": now_ms - int(settings.job_lease_seconds * 1000)})

    browser.get(f"{base}/dashboard")
    wait_until(lambda: text_of(browser, "#live") == "live", what="the page, without a key")
    assert text_of(browser, "#mode") == "read-only"
    stalled = '#workers tr[data-worker="host:9:stalled"] td:nth-child(2)'
    wait_until(lambda: text_of(browser, stalled).endswith(" ago (late)"), what="a late worker")
    browser.find_element(By.ID, "lookup-id").send_keys(task_id)
    browser.find_element(By.CSS_SELECTOR, "#lookup-form button").click()
    wait_until(lambda: text_of(browser, "#task-status") == "pending", what="the task lookup")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#task button.cancel")
    assert [b.is_displayed() for b in buttons] == [False]


def send_local(base: str) -> str:
    """A send while API_KEYS is unset (a local request), scheduled an hour ahead so it
    stays pending (no worker runs in that test anyway)."""
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    response = httpx.post(f"{base}/api/v1/email/received", json=mail(send_at=later), timeout=5)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_a_relay_that_is_down_reads_as_down_on_the_workers_table(
    browser: Any, procs: Procs, make_settings: Callable[..., Settings]
) -> None:
    with refused_port() as down:  # nothing listens: the worker's breaker opens at start
        settings = make_settings(smtp_port=port_of(down), dashboard_read_only=True)
        base = procs.api(settings)
        worker = procs.worker(settings)
        browser.get(f"{base}/dashboard")
        relay = f'#workers tr[data-worker^="{socket.gethostname()}:{worker.pid}:"] td:nth-child(3)'
        wait_until(lambda: text_of(browser, relay).startswith("relay down since "),
                   what="the worker's relay shown as down")  # fmt: skip
        # In words, not breaker jargon ("open" reads as fine).
        assert text_of(browser, relay).endswith(", probing")
