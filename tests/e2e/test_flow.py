"""The original flow across real processes: POST -> worker -> SMTP -> poll."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from emailq.settings import Settings
from tests.conftest import Procs, wait_until
from tests.smtpd import SmtpServer


def test_posted_mail_arrives_and_result_shows_success(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings()
    base = procs.api(settings)
    procs.worker(settings)

    response = httpx.post(
        f"{base}/api/v1/email/received",
        json={"to": "user@example.com", "subject": "Hello {username}",
              "body": "{username}님 안녕하세요!", "username": "홍길동"},
        headers={"X-Request-ID": "e2e-flow-1"},
    )  # fmt: skip
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert response.json() == {"task_id": task_id, "status": "queued"}

    def settled() -> bool:
        r = httpx.get(f"{base}/api/v1/email/result", params={"task_id": task_id})
        return bool(r.json()["status"] == "success")

    wait_until(settled, what="task success")
    result = httpx.get(f"{base}/api/v1/email/result", params={"task_id": task_id}).json()
    assert result["to"] == "user@example.com"
    assert result["attempts"] == 1
    assert result["request_id"] == "e2e-flow-1"
    assert result["attempt_log"][0]["code"] == 250
    [mail] = smtp.handler.received
    assert mail.task_id == task_id
    assert mail.message["Subject"] == "Hello 홍길동"
    assert mail.message.get_body().get_content().strip() == "홍길동님 안녕하세요!"
