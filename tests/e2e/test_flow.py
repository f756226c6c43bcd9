"""The original flow across real processes: POST -> worker -> SMTP -> poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import redis

from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer


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


async def test_concurrent_posts_are_coalesced_and_every_mail_arrives_once(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, redis_url: str
) -> None:
    # A real API process under 60 simultaneous sends: each answer is a stored task, and
    # the stores shared script calls (fewer calls than sends), so nothing was merged away
    # or sent twice.
    settings = make_settings()
    base = procs.api(settings)
    store = redis.Redis.from_url(redis_url)
    calls_before = store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        replies = await asyncio.gather(*(
            client.post("/api/v1/email/received",
                        json={"to": f"user{i}@example.com", "subject": f"n{i}", "body": "Hi"})
            for i in range(60)
        ))  # fmt: skip
    assert [r.status_code for r in replies] == [202] * 60
    calls = store.info("commandstats")["cmdstat_evalsha"]["calls"] - calls_before
    store.close()
    assert calls < 60
    task_ids = [r.json()["task_id"] for r in replies]
    assert len(set(task_ids)) == 60
    procs.worker(settings)
    wait_until(lambda: len(smtp.handler.received) >= 60, what="60 mails")
    received = smtp.handler.received
    assert sorted(m.task_id for m in received) == sorted(task_ids)
    by_task = {m.task_id: m for m in received}
    for i, task_id in enumerate(task_ids):  # each answer names the mail it asked for
        assert by_task[task_id].message["Subject"] == f"n{i}"
