"""The relay fails, not the mail: real API, worker processes, Redis and aiosmtpd servers.

Each test counts at the SMTP server what the API accepted: *lost* (accepted, never
received), *duplicated* (received more than once), and checks that an outage or
throttling used up no attempt. Waits are bounded; no duration of ours is asserted. The
shared send rate is checked against the bucket's own arithmetic (see
``test_two_workers_share_one_send_rate``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from emailq.settings import Settings
from tests.helpers.api import Api, all_succeeded, outcomes
from tests.helpers.polling import read_log, wait_for_log, wait_until
from tests.helpers.ports import port_of, reclaim_port, refused_port
from tests.helpers.processes import Procs, settings_env
from tests.helpers.smtpd import (
    Authenticator,
    Counts,
    RecordingHandler,
    SmtpServer,
    ThrottlingHandler,
)

pytestmark = pytest.mark.slow

# Probes at most every half second, so a returning relay is noticed quickly.
FAST_PROBES = {"smtp_probe_max_seconds": 0.5}


def relay_states(api: Api) -> list[dict[str, Any]]:
    response = api.client.get("/api/v1/admin/stats")
    assert response.status_code == 200, response.text
    states: list[dict[str, Any]] = response.json()["relay"]
    return states


def worker_health(settings: Settings) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "worker", "health"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    return done.returncode, done.stdout.strip()


def delivered_once(api: Api, ids: list[str], handler: RecordingHandler, label: str) -> Counts:
    """Every task succeeded, none lost or duplicated, and each on its first attempt."""
    results = api.wait_terminal(ids)
    counts = Counts.of(ids, handler).report(label)
    all_succeeded(results)
    assert (counts.lost, counts.duplicated) == (0, 0)
    spent = {t: r["attempts"] for t, r in results.items() if r["attempts"] != 1}
    assert not spent, f"attempts used up by the relay's fault: {spent}"
    return counts


# -- a wrong SMTP_PORT, then the relay appears on it ---------------------------------------


def test_wrong_port_then_the_relay_appears_fails_nothing(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    with refused_port() as down:  # bound, not listening: connections are refused
        port = port_of(down)
        settings = make_settings(smtp_port=port, worker_concurrency=4, **FAST_PROBES)
        api = Api(procs.api(settings))
        worker = procs.worker(settings)
        # One line at startup saying what is wrong, and the worker keeps running.
        assert f"connection refused at 127.0.0.1:{port}" in read_log(worker)
        ids = api.enqueue(20)

        wait_until(lambda: len(relay_states(api)) == 1, what="breaker state published", proc=worker)
        [state] = relay_states(api)
        assert state["state"] in ("open", "half_open"), state
        assert "Connect" in state["error"]
        code, line = worker_health(settings)
        assert code == 1
        assert "DOWN on 1 of 1" in line
        assert worker.poll() is None

        handler = RecordingHandler()
        smtp_factory(sock=down, handler=handler)  # up on that very port
        delivered_once(api, ids, handler, "wrong SMTP_PORT, then the relay")
    wait_until(lambda: relay_states(api)[0]["state"] == "closed", what="breaker closed")
    assert worker_health(settings)[0] == 0
    # Logged once per state change, not once per mail or per probe.
    log = read_log(worker)
    assert log.count("is back after") == 1, log[-3000:]


# -- the relay stops for a while, then comes back on the same port -------------------------


def test_relay_down_for_a_while_fails_and_repeats_nothing(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    handler = RecordingHandler()
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=4, **FAST_PROBES)
    api = Api(procs.api(settings))
    worker = procs.worker(settings)
    before = api.enqueue(10)
    wait_until(lambda: len(handler.received) == 10, what="first batch sent", proc=worker)

    smtp.stop()  # the worker's pooled connections die with it
    during = api.enqueue(10)
    wait_for_log(worker, "pausing sends")
    smtp_factory(sock=reclaim_port(smtp.port), handler=handler)  # back on the same port

    delivered_once(api, before + during, handler, "relay down, then back")
    assert any("deferred" in outcomes(r) for r in api.results(during).values())
    assert worker.poll() is None


# -- the outage outlasts SMTP_OUTAGE_MAX_SECONDS ----------------------------------------------


def test_the_outage_ceiling_fails_waiting_mail_with_the_outage_reason(
    procs: Procs, make_settings: Callable[..., Settings]
) -> None:
    with refused_port() as down:
        settings = make_settings(smtp_port=port_of(down), smtp_outage_max_seconds=2,
                                 **FAST_PROBES)  # fmt: skip
        api = Api(procs.api(settings))
        procs.worker(settings)
        ids = api.enqueue(5)
        results = api.wait_terminal(ids)

    for result in results.values():
        assert result["status"] == "failed", result
        assert result["reason"].startswith("relay unreachable for 2s: "), result
        assert "Connect" in result["reason"], result
        assert result["attempts"] == 0, result


# -- the relay throttles: 421 for a while -------------------------------------------------


@pytest.mark.parametrize("max_per_second", [0, 50])
def test_throttling_uses_no_attempt_and_delivers_once(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    max_per_second: int,
) -> None:
    handler = ThrottlingHandler()
    handler.throttling.set()
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=4,
                             smtp_max_per_second=max_per_second, max_attempts=2)  # fmt: skip
    api = Api(procs.api(settings))
    worker = procs.worker(settings)
    ids = api.enqueue(10)
    wait_until(lambda: handler.throttled >= 10, what="ten 421 replies", proc=worker)
    handler.throttling.clear()

    delivered_once(api, ids, handler, f"421 for a while (max {max_per_second}/s)")
    results = api.results(ids)
    assert any("deferred" in outcomes(r) for r in results.values())
    if max_per_second:
        # The throttling slowed the shared rate down (AIMD), once per state of affairs.
        assert "send rate now" in read_log(worker)
    else:
        assert read_log(worker).count("set SMTP_MAX_PER_SECOND") == 1


# -- two workers share one send rate ------------------------------------------------------


def most_in_any_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` (sorted) within any ``window`` seconds."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_two_workers_share_one_send_rate(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    rate, concurrency, count = 5, 2, 30
    handler = ThrottlingHandler()
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=concurrency,
                             smtp_max_per_second=rate)  # fmt: skip
    api = Api(procs.api(settings))
    ids = api.enqueue(count)
    workers = [procs.worker(settings), procs.worker(settings)]

    delivered_once(api, ids, handler, f"two workers, {rate}/s")
    for worker in workers:
        assert '"event":"sent"' in read_log(worker), "both workers must have sent"
    # The bucket hands out slots at least 1/rate apart, and a mail reaches the server no
    # earlier than its slot. A window of W seconds can thus hold the mails whose slots fall
    # in it (at most rate*W + 1) plus those still on their way from earlier slots: at most
    # one per send in flight (2 workers x concurrency). No assumption about our speed.
    times = handler.times()
    for window in (1.0, 2.0, 4.0):
        allowed = rate * window + 1 + 2 * concurrency
        seen = most_in_any_window(times, window)
        print(f"shared rate: {seen} mails in the busiest {window:g}s (allowed {allowed:g})")
        assert seen <= allowed


# -- the startup check: one line, and exit 2 only for certain configuration errors ----------


def run_worker_to_exit(settings: Settings) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "worker"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    ("security", "auth", "expected"),
    [
        ("starttls", False, "server does not offer STARTTLS; try SMTP_SECURITY=none or tls"),
        ("tls", False, "the server does not speak implicit TLS; try SMTP_SECURITY=starttls"),
        ("none", True, "login as SMTP_USER 'mailer' refused: 535"),
    ],
)
def test_a_certain_configuration_error_is_one_line_and_exit_2(
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    security: str,
    auth: bool,
    expected: str,
) -> None:
    smtp = smtp_factory(auth=Authenticator("mailer", "s3cret") if auth else None)
    login = {"smtp_user": "mailer", "smtp_pass": "Zq-not-the-pa55"} if auth else {}
    settings = make_settings(smtp_port=smtp.port, smtp_security=security, **login)

    code, stderr = run_worker_to_exit(settings)

    assert code == 2, stderr
    relay_lines = [line for line in stderr.splitlines() if "SMTP relay" in line]
    assert len(relay_lines) == 1, stderr
    assert expected in relay_lines[0]
    assert "Traceback" not in stderr
    assert "Zq-not-the-pa55" not in stderr  # the password never reaches the log
    assert smtp.handler.received == []


def test_the_worker_health_answer_needs_a_live_worker(
    make_settings: Callable[..., Settings],
) -> None:
    assert worker_health(make_settings()) == (1, "no worker reports")
