"""arq doing emailq's job: same message build, same pooled SMTP sender, same concurrency.

Runs in .venv-arq (arq needs redis<6). Usage: ``python -m bench.arq_peer URL PORT N C``;
prints one JSON line with the drain rate of a burst worker over N preloaded jobs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import uvloop
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from bench.common import MAIL_FROM, job, new_task_id
from emailq.message import build_message
from emailq.models import Job
from emailq.settings import Settings
from worker.sender import Sender, SmtpPool


async def send(ctx: dict[str, Any], task_id: str, payload: str) -> None:
    """The job: build the message and send it over a pooled connection."""
    j = Job.model_validate_json(payload)
    msg = build_message(task_id, j, MAIL_FROM)
    async with ctx["sender"].session() as conn:
        await conn.send(msg, "noreply@example.com", j.recipients)


async def main(url: str, port: int, n: int, concurrency: int) -> None:
    parts = urlsplit(url)
    redis_settings = RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    pool = await create_pool(redis_settings)
    for start in range(0, n, 200):
        await asyncio.gather(*(pool.enqueue_job("send", new_task_id(), job(i).model_dump_json())
                               for i in range(start, min(n, start + 200))))  # fmt: skip
    settings = Settings(_env_file=None, smtp_host="127.0.0.1", smtp_port=port,  # type: ignore[call-arg]
                        smtp_security="none", mail_from=MAIL_FROM)  # fmt: skip

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["sender"] = Sender(SmtpPool(settings, size=concurrency))

    worker = Worker(functions=[func(send, name="send")], redis_settings=redis_settings,
                    max_jobs=concurrency, burst=True, handle_signals=False,
                    on_startup=startup)  # fmt: skip
    started = time.perf_counter()
    await worker.async_run()
    elapsed = time.perf_counter() - started
    await worker.close()
    print(json.dumps({"rate": n / elapsed, "complete": worker.jobs_complete}))


if __name__ == "__main__":
    # The loop emailq's worker runs on: the comparison is of queues, not event loops.
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
