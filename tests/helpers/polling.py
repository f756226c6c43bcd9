"""Waiting for a condition, never for a fixed time.

Each wait polls its condition until it holds; the deadline only bounds a failing (hung)
test, and nothing is asserted about how long the wait took.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BOUND = 20.0  # seconds; how long a hung test may take to fail


def read_log(proc: subprocess.Popen[bytes]) -> str:
    """Everything a process started by ``Procs`` has written so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = BOUND,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``check`` until true; fail early, with its log, if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) waiting for {what}:\n"
                                 + read_log(proc)[-3000:])  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for_log(proc: subprocess.Popen[bytes], text: str, timeout: float = BOUND) -> None:
    """Wait until ``text`` appears in the process's log."""
    wait_until(lambda: text in read_log(proc), what=f"log line {text!r}", proc=proc,
               timeout=timeout)  # fmt: skip


async def wait_for(check: Callable[[], bool], what: str, within: float = BOUND) -> None:
    """``wait_until`` for a coroutine: poll a plain check without blocking the loop."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     within: float = BOUND) -> None:  # fmt: skip
    """Poll an awaitable check until it is true."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
