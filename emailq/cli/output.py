"""How the CLI shows things: JSON for machines, plain-column tables for people, and a
progress bar on stderr. Every piece of command output is formatted here.

JSON goes to stdout as one document per command; times in it are RFC 3339 UTC strings, as
the API writes them. Tables, progress and problems go where a shell user expects them:
results on stdout, everything else on stderr, so ``emailq send ... > ids.txt`` works.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from emailq.models import QueueStats, RelayState, TaskRecord, WorkerRelay, iso

_TIME_FIELDS = ("created_at", "updated_at", "sent_at", "next_attempt_at", "scheduled_at",
                "expires_at")  # fmt: skip


def _short_time(ms: int | None) -> str:
    text = iso(ms, "seconds")
    return "-" if text is None else text.replace("+00:00", "Z")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


# -- JSON --------------------------------------------------------------------------------


def record_json(record: TaskRecord) -> dict[str, Any]:
    """A task record as JSON in the shape the API's result endpoint answers."""
    data = record.model_dump(mode="json", exclude_none=True)
    for name in _TIME_FIELDS:
        if name in data:
            data[name] = iso(data[name])
    if not data.get("reason"):
        data.pop("reason", None)
    for name in ("metadata", "tags"):  # absent when none, as the API answers
        if not data.get(name):
            data.pop(name, None)
    log = data.pop("log")
    data["attempt_log"] = [{**entry, "at": iso(entry["at"])} for entry in log]
    return data


def stats_json(stats: QueueStats) -> dict[str, Any]:
    """Queue statistics as JSON."""
    return stats.model_dump(mode="json")


# -- tables ------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]  # fmt: skip
    return "\n".join(lines)


def _one_line(text: str | None, limit: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def task_text(record: TaskRecord) -> str:
    """One task: its fields, then its attempt log."""
    fields: list[tuple[str, object]] = [
        ("task_id", record.task_id),
        ("status", record.status.value),
        ("to", record.to),
        ("priority", record.priority.value),
        ("attempts", record.attempts),
        ("created_at", _short_time(record.created_at)),
        ("updated_at", _short_time(record.updated_at)),
    ]
    if record.reason:
        fields.insert(5, ("reason", record.reason))
    for name in ("sent_at", "next_attempt_at", "scheduled_at", "expires_at"):
        value = getattr(record, name)
        if value is not None:
            fields.append((name, _short_time(value)))
    if record.request_id:
        fields.append(("request_id", record.request_id))
    fields += _label_lines(record)
    width = max(len(name) for name, _ in fields)
    head = "\n".join(f"{name.ljust(width)}  {'-' if v is None else v}" for name, v in fields)
    if not record.log:
        return head
    rows = [(_short_time(a.at), a.attempt, a.outcome, a.code, _one_line(a.reply))
            for a in record.log]  # fmt: skip
    return head + "\n\n" + table(["AT", "ATTEMPT", "OUTCOME", "CODE", "REPLY"], rows)


def _label_lines(record: TaskRecord) -> list[tuple[str, object]]:
    """``tags`` on one line, then one ``metadata.<key>`` line per key."""
    lines: list[tuple[str, object]] = []
    if record.tags:
        lines.append(("tags", ", ".join(record.tags)))
    lines += [(f"metadata.{key}", value) for key, value in record.metadata.items()]
    return lines


def failed_text(records: Sequence[TaskRecord]) -> str:
    """Dead letters, one per line."""
    rows = [(r.task_id, _short_time(r.updated_at), r.to, r.attempts, _one_line(r.reason, 50))
            for r in records]  # fmt: skip
    return table(["TASK_ID", "FAILED_AT", "TO", "ATTEMPTS", "REASON"], rows)


def stats_text(stats: QueueStats) -> str:
    """Lanes as a table, then the other counters."""
    rows = [(s.priority.value, s.depth, _age(s.oldest_age_seconds)) for s in stats.lanes]
    lanes = table(["PRIORITY", "DEPTH", "OLDEST"], rows)
    counters = [
        ("scheduled", stats.scheduled),
        ("in flight", stats.in_flight),
        ("live workers", stats.live_workers),
        ("dead letters", stats.failed),
        ("sent", f"{stats.sent_last_minute} last minute, {stats.sent_last_hour} last hour"),
        ("failed", f"{stats.failed_last_minute} last minute, {stats.failed_last_hour} last hour"),
        ("relay", relay_text(stats.relay)),
    ]
    return lanes + "\n\n" + table(["COUNTER", "VALUE"], counters)


def relay_text(workers: Sequence[WorkerRelay]) -> str:
    """The workers' breakers in one line: "ok" while every one is closed."""
    if not workers:
        return "no worker reports"
    down = [w for w in workers if w.state is not RelayState.CLOSED]
    rate = next((w.send_rate for w in workers if w.send_rate is not None), None)
    paced = f", {rate:g} mails/s" if rate is not None else ""
    if not down:
        return f"ok ({len(workers)} worker(s){paced})"
    errors = sorted({w.error for w in down if w.error})
    why = f": {_one_line(errors[0], 60)}" if errors else ""
    return f"DOWN on {len(down)} of {len(workers)} worker(s){why}"


# -- the streams -------------------------------------------------------------------------


@dataclass
class Output:
    """Where a command writes: ``emit`` a result, ``note`` or ``error`` to stderr."""

    json_mode: bool
    stdout: TextIO
    stderr: TextIO
    progress_bars: bool = False  # only on a terminal: \r redraws make a mess of log files

    def emit(self, data: object, text: str) -> None:
        """The command's result: ``data`` as JSON with --json, else ``text``."""
        if self.json_mode:
            self.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        elif text:
            self.stdout.write(text + "\n")

    def note(self, text: str) -> None:
        """Information for a person (summaries, rejected input); never mixed into JSON."""
        self.stderr.write(text + "\n")

    def error(self, text: str) -> None:
        """Why a command failed."""
        self.stderr.write(f"emailq: {text}\n")

    def progress(self, label: str, total: int | None) -> Progress:
        """A progress bar on stderr (drawn only when stderr is a terminal)."""
        return Progress(label, total, self.stderr, enabled=self.progress_bars)


class Progress:
    """A one-line bar redrawn in place with ``\\r``, at most ten times a second."""

    WIDTH = 30
    INTERVAL = 0.1

    def __init__(self, label: str, total: int | None, stream: TextIO, *, enabled: bool) -> None:
        self.label, self.total, self.stream, self.enabled = label, total, stream, enabled
        self.done = 0
        self._drawn_at = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, count: int) -> None:
        """Count ``count`` more items done; redraw if it is time."""
        self.done += count
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= self.INTERVAL:
            self._drawn_at = now
            self._draw()

    def line(self) -> str:
        """The bar as it reads now."""
        if not self.total:
            return f"{self.label} {self.done}"
        filled = min(self.WIDTH, self.WIDTH * self.done // self.total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        percent = 100 * self.done // self.total
        return f"{self.label} [{bar}] {self.done}/{self.total} {percent:3d}%"

    def _draw(self) -> None:
        self.stream.write("\r" + self.line())
        self.stream.flush()
