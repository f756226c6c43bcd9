"""Reading the JSON log lines of a process started by ``Procs`` (LOG_FORMAT=auto writes JSON
to a file)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from typing import Any

from emailq.settings import Settings
from tests.helpers.polling import BOUND, read_log
from tests.helpers.processes import Procs, settings_env

# RFC 3339, UTC, milliseconds: 2026-11-22T04:28:56.730Z
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def json_lines(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as one JSON object (fails on any other)."""
    lines = []
    for number, text in enumerate(read_log(proc).splitlines(), 1):
        try:
            line = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"line {number} is not JSON: {text!r}") from exc
        assert isinstance(line, dict), f"line {number} is not an object: {text!r}"
        lines.append(line)
    return lines


def events(proc: subprocess.Popen[bytes], event: str) -> list[dict[str, Any]]:
    """The process's lines whose event is ``event``."""
    return [line for line in json_lines(proc) if line["event"] == event]


class Piped:
    """A process whose log goes to a pipe that nobody reads until ``read_until`` or
    ``rest``: once the pipe's buffer (64 KiB) is full, its writes block, as they do behind
    a stalled log shipper. Killed at teardown by ``Procs.stop_all``."""

    def __init__(self, procs: Procs, args: list[str], settings: Settings) -> None:
        self.proc = subprocess.Popen(args, env=settings_env(settings), cwd=procs.tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        procs.started.append(self.proc)
        self.lines: list[str] = []

    def read_until(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (bounded); then stop reading."""
        found: list[re.Match[str]] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                self.lines.append(raw.decode())
                match = re.search(pattern, self.lines[-1])
                if match:
                    found.append(match)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(BOUND)
        assert found, f"no line matching {pattern!r}:\n" + "".join(self.lines)[-3000:]
        return found[0]

    def rest(self) -> list[dict[str, Any]]:
        """Read to the end (the process must be ending); every line, parsed."""
        out, _ = self.proc.communicate(timeout=60)
        text = "".join(self.lines) + out.decode()
        return [json.loads(line) for line in text.splitlines()]
