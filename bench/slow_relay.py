"""The slow relay: a sink that answers every command ``delay`` later (bench/sink.py), and how
close one worker process comes to the rate that latency alone allows.

For each delay (20 ms and 100 ms by default), against the same sink process:

- the reference: a raw aiosmtplib client on ONE connection sends mails one after another;
  its time per mail gives the latency-bound limit = connections / time per mail;
- the same with SMTP PIPELINING (RFC 2920) by hand: MAIL, RCPT and DATA in one write, then
  the message: what a pipelining client would need per mail (aiosmtplib does not pipeline);
- the plain loop (bench/drain.py) on ``connections`` connections in one process: what one
  Python process sending with aiosmtplib reaches, with no queue at all;
- the emailq worker, one process, ``WORKER_CONCURRENCY=connections``: mails/s, its ratio to
  the limit, RSS, and Redis calls per mail (INFO commandstats, as the fast drain counts);
  the median of ``rounds`` drains, every round's rate kept;
- optionally the peers at the same concurrency.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop

from bench import drain
from bench.common import (
    MAIL_FROM,
    ROOT,
    SENDER,
    cpu_seconds,
    exe,
    flush_all,
    job,
    listening,
    median_by,
    new_task_id,
    send_job,
    spawn,
    stop,
    wait_until,
)
from emailq.devtools.redis_server import free_port
from emailq.message import render


async def one_connection(port: int, count: int) -> float:
    """Seconds per mail, aiosmtplib on one reused connection (connect not counted)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    started = time.perf_counter()
    for i in range(count):
        j = job(i)
        await send_job(smtp, new_task_id(), j)
    elapsed = time.perf_counter() - started
    await smtp.quit()
    return elapsed / count


async def _replies(reader: asyncio.StreamReader, count: int) -> None:
    for _ in range(count):
        while (line := await reader.readline())[3:4] == b"-":
            pass
        if line[:1] not in (b"2", b"3"):
            raise RuntimeError(f"sink answered {line!r}")


async def pipelined_connection(port: int, count: int) -> float:
    """Seconds per mail with MAIL, RCPT and DATA sent in one group (RFC 2920 section 3.1:
    DATA ends a group), then the message: two round trips a mail instead of four."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _replies(reader, 1)
    writer.write(b"EHLO bench\r\n")
    await _replies(reader, 1)
    started = time.perf_counter()
    for i in range(count):
        j = job(i)
        body = render(new_task_id(), j, MAIL_FROM).as_bytes()
        rcpts = b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in j.recipients)
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode() + rcpts + b"DATA\r\n")
        await _replies(reader, 2 + len(j.recipients))
        writer.write(re.sub(rb"(?m)^\.", b"..", body) + b".\r\n")
        await _replies(reader, 1)
    elapsed = time.perf_counter() - started
    writer.write(b"QUIT\r\n")
    writer.close()
    return elapsed / count


class Cpu:
    """CPU share (CPU seconds per wall second) of this process and of the sink over a step:
    near 1.0 is a process that is the limit, whatever the relay's latency."""

    def __init__(self, sink_pid: int) -> None:
        self.sink_pid = sink_pid
        self.own = self.sink = 0.0

    def __enter__(self) -> Cpu:
        self._start = (time.perf_counter(), time.process_time(), cpu_seconds(self.sink_pid))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, own, sink = self._start
        elapsed = time.perf_counter() - wall
        self.own = (time.process_time() - own) / elapsed
        self.sink = (cpu_seconds(self.sink_pid) - sink) / elapsed


def _median_drain(
    redis_url: str, port: int, n: int, connections: int, tmp: Path, sink_pid: int, rounds: int
) -> tuple[dict[str, Any], Cpu, list[float]]:
    """``rounds`` worker drains into the sink: the one of the median rate (with the sink's
    CPU over it), and every round's rate. The limit is set by latency alone and does not
    move with this VM's speed, but a worker at 256 in flight is CPU-bound and does: one drain
    is one sample of that speed (0.78x, 0.91x and 0.84x the limit in three runs of one day)."""
    drains = []
    for _ in range(rounds):
        with Cpu(sink_pid) as cpu:
            ours = drain.emailq_drain(redis_url, port, n, 1, connections, tmp)
        drains.append((ours, cpu))
    ours, cpu = median_by(drains, lambda d: d[0]["rate"])
    return ours, cpu, [d[0]["rate"] for d in drains]


def one_delay(redis_url: str, delay_ms: float, n: int, connections: int, tmp: Path,
              peers: bool, rounds: int = 1) -> dict[str, Any]:  # fmt: skip
    port = free_port()
    sink = spawn([exe(), "-m", "bench.sink", str(port), str(delay_ms)], {"PYTHONPATH": str(ROOT)},
                 tmp / f"slow-sink-{delay_ms:g}.log")  # fmt: skip
    try:
        wait_until(lambda: listening(port), timeout=30, every=0.02)
        # Enough mails for a steady figure, few enough to take about two seconds each.
        count = max(5, int(2000 / (4 * delay_ms)))
        per_mail = uvloop.run(one_connection(port, count))
        pipelined = uvloop.run(pipelined_connection(port, count))
        with Cpu(sink.pid) as plain_cpu:
            plain = uvloop.run(drain.plain_loop(port, n, connections))
        ours, ours_cpu, rates = _median_drain(redis_url, port, n, connections, tmp, sink.pid,
                                              rounds)  # fmt: skip
        result: dict[str, Any] = {
            "delay_ms": delay_ms, "connections": connections, "n": n,
            "one_connection_s_per_mail": per_mail, "pipelined_s_per_mail": pipelined,
            "limit": connections / per_mail, "pipelined_limit": connections / pipelined,
            "plain_rate": plain, "emailq": ours, "emailq_rates": rates,
            "plain_cpu_share": plain_cpu.own, "plain_sink_cpu_share": plain_cpu.sink,
            "emailq_sink_cpu_share": ours_cpu.sink,
        }  # fmt: skip
        if peers:
            result["peers"] = {
                "arq": drain.peer_drain("arq", redis_url, port, n, connections, tmp),
                "saq": drain.peer_drain("saq", redis_url, port, n, connections, tmp),
            }
        return result
    finally:
        stop(sink)


def run(redis_url: str, tmp: Path, *, delays_ms: list[float], n: int, connections: int,
        peers: bool, rounds: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    flush_all(redis_url)
    return [one_delay(redis_url, d, n, connections, tmp, peers, rounds) for d in delays_ms]
