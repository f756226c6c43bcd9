"""emailq.logs: the line formats, the context, the masking, the listener thread, and the
flush at exit and at SIGTERM (in child processes, since both end a process)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emailq import logs
from emailq.logs import MAX_BATCH, LogPipeline, bind, configure_logging, resolve_format, unbind
from emailq.models import Priority
from emailq.settings import LogFormat, Settings
from emailq.startup import describe
from tests.helpers.logs import RFC3339_MS
from tests.helpers.polling import BOUND, wait_until

log = logging.getLogger("emailq.test")


class Lines(io.StringIO):
    """A stream that keeps what is written, and can be made to block (a stalled reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()

    def write(self, text: str) -> int:
        self.open.wait()
        return super().write(text)

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


@pytest.fixture
def pipeline(request: pytest.FixtureRequest) -> Iterator[tuple[LogPipeline, Lines]]:
    """Our pipeline on the root logger, writing to a ``Lines``; parametrize with the format."""
    root = logging.getLogger()
    # Alone on the root logger: pytest's capture handlers would format on the caller.
    level, others = root.level, root.handlers[:]
    root.handlers.clear()
    stream = Lines()
    started = configure_logging("DEBUG", getattr(request, "param", LogFormat.JSON), stream)
    yield started, stream
    stream.open.set()
    started.close()
    root.handlers[:] = others
    root.setLevel(level)


def _json(pipeline: tuple[LogPipeline, Lines]) -> list[dict[str, Any]]:
    started, stream = pipeline
    started.stop()
    return [json.loads(line) for line in stream.lines()]


def test_a_json_line_has_the_event_and_its_known_context(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    log.info("sent", extra={"task_id": "t-1", "attempt": 2, "smtp_code": 250,
                            "duration_ms": 12.5, "request_id": None, "unknown": "x"})  # fmt: skip

    [line] = _json(pipeline)
    assert RFC3339_MS.match(line.pop("time"))
    assert line == {"level": "info", "logger": "emailq.test", "event": "sent", "task_id": "t-1",
                    "attempt": 2, "smtp_code": 250, "duration_ms": 12.5}  # fmt: skip


def test_bound_context_reaches_every_line_and_extra_wins(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    token = bind(request_id="r-1", worker_id="w-1")
    try:
        log.info("one")
        log.info("two", extra={"request_id": "r-2"})
    finally:
        unbind(token)
    log.info("three")

    lines = _json(pipeline)
    assert [(e.get("request_id"), e.get("worker_id")) for e in lines] == [
        ("r-1", "w-1"), ("r-2", "w-1"), (None, None)
    ]  # fmt: skip


def test_addresses_and_api_keys_are_masked_in_events_fields_and_tracebacks(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    key = "eq_" + "Ab1_-" * 8
    try:
        raise ValueError(f"relay said: 550 <jane.doe+x@example.com> unknown ({key})")
    except ValueError:
        extra = {"smtp_reply": "250 ok <bob@example.org>", "path": f"/{key}"}
        log.exception("failed for %s", "Jane <jane.doe@example.com>", extra=extra)

    [line] = _json(pipeline)
    text = json.dumps(line)
    for secret in ("jane.doe", "bob@", key):
        assert secret not in text
    assert line["event"] == "failed for Jane <***@example.com>"
    assert line["smtp_reply"] == "250 ok <***@example.org>"
    assert line["path"] == "/eq_***"
    assert "<***@example.com> unknown (eq_***)" in line["exc"]


def test_a_redacted_redis_url_reads_as_redacted_and_a_raw_one_loses_its_password() -> None:
    # The worker logged "Redis at redis:***@host": the address mask took redact_url's
    # "//***" for a local part.
    url = "redis://mailer:Red1sPa55word@127.0.0.1:6391/0"
    assert logs.scrub(f"Redis at {logs.redact_url(url)};") == \
        "Redis at redis://***@127.0.0.1:6391/0;"  # fmt: skip
    assert "Red1sPa55word" not in logs.scrub(f"Redis at {url}")  # masked even if not redacted
    assert logs.scrub("to x/y@example.com") == "to ***@example.com"
    for odd in ("/@x.com", "//@x.com", "*/*@x.org", "***/@x.com", "//***@x.com"):  # valid ones
        assert logs.scrub(f"to {odd}") == "to ***@" + odd.rpartition("@")[2]


@pytest.mark.parametrize("pipeline", [LogFormat.TEXT], indirect=True)
def test_a_text_line_is_one_line_whatever_a_value_holds(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    started, stream = pipeline
    extra = {"request_id": "r-1", "path": "/x\ny", "http_status": 404}
    log.warning("refused %s", "a\r\nFAKE line", extra=extra)
    started.stop()

    [line] = stream.lines()
    assert line.endswith(' WARNING emailq.test [req=r-1 task=-] refused a\\x0d\\x0aFAKE line '
                         'path="/x\\ny" http_status=404')  # fmt: skip


@pytest.mark.parametrize("pipeline", [LogFormat.TEXT], indirect=True)
def test_a_text_line_names_the_worker_bound_for_its_run(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    # Two workers' text lines merged in one terminal (make dev) or file: which sent it.
    started, stream = pipeline
    token = bind(worker_id="vm:4242:a1b2c3")
    try:
        log.info("sent", extra={"task_id": "t-1", "attempt": 1, "smtp_code": 250})
    finally:
        unbind(token)
    started.stop()

    [line] = stream.lines()
    assert line.endswith(" INFO emailq.test [req=- task=t-1] sent worker_id=vm:4242:a1b2c3 "
                         "attempt=1 smtp_code=250")  # fmt: skip


def test_formatting_happens_on_the_listener_thread_not_the_callers(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    seen: list[str] = []

    class Traced(str):
        __slots__ = ()

        def __str__(self) -> str:
            seen.append(threading.current_thread().name)
            return "traced"

    started, _ = pipeline
    listener = started.listener._thread.name  # type: ignore[union-attr]
    # pytest adds its capture handlers for the test's call, and they format at the call.
    logging.getLogger().handlers[:] = [started.handler]
    log.info("value %s", Traced("x"))

    [line] = _json(pipeline)
    assert line["event"] == "value traced"
    assert seen == [listener]


@pytest.mark.parametrize("pipeline", [LogFormat.JSON, LogFormat.TEXT], indirect=True)
def test_log_line_writes_the_line_logger_log_writes(
    pipeline: tuple[LogPipeline, Lines], monkeypatch: pytest.MonkeyPatch
) -> None:
    started, stream = pipeline
    logging.getLogger().handlers[:] = [started.handler]  # as in a served process
    monkeypatch.setattr(time, "time", lambda: 1764700000.0421)  # both lines at one instant
    fields = {
        "task_id": "t-1",
        "lane": "default",
        "path": "/x\ny",
        "http_status": 404,
        "duration_ms": 1.5,
        "smtp_reply": "550 no ***@example.com",
        "attempt": None,
    }
    token = bind(request_id="r-1", worker_id="w-1", lane="bound")
    try:
        for level in (logging.INFO, logging.WARNING):
            log.log(level, "accepted user@example.com", extra=fields)
            logs.log_line(log, level, "accepted user@example.com", fields)
    finally:
        unbind(token)
    started.stop()

    lines = stream.lines()
    assert len(lines) == 4
    assert lines[0] == lines[1]
    assert lines[2] == lines[3]
    for part in ("***@example.com", "r-1", "default"):
        assert part in lines[0]


@pytest.mark.parametrize("pipeline", [LogFormat.JSON, LogFormat.TEXT], indirect=True)
def test_log_line_is_formatted_on_the_listener_thread(
    pipeline: tuple[LogPipeline, Lines], monkeypatch: pytest.MonkeyPatch
) -> None:
    started, stream = pipeline
    logging.getLogger().handlers[:] = [started.handler]
    listener = started.listener._thread.name  # type: ignore[union-attr]
    formatted_on: list[str] = []
    emit_line = logs.BatchWriter.emit_line

    def traced(self: logs.BatchWriter, line: logs.Line) -> None:
        formatted_on.append(threading.current_thread().name)
        emit_line(self, line)

    monkeypatch.setattr(logs.BatchWriter, "emit_line", traced)
    logs.log_line(log, logging.INFO, "accepted", {"task_id": "t-1"})
    logs.log_line(log, logging.DEBUG - 1, "below the level", {})
    started.stop()

    [line] = stream.lines()
    assert "accepted" in line
    assert "t-1" in line
    assert formatted_on == [listener]


def test_log_line_goes_the_usual_way_to_any_other_handler(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    started, _ = pipeline
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign,assignment]
    logging.getLogger().handlers[:] = [started.handler]
    log.addHandler(other)  # as a test's capture handler would be
    try:
        logs.log_line(log, logging.INFO, "accepted", {"task_id": "t-1"})
    finally:
        log.removeHandler(other)

    [line] = _json(pipeline)
    assert line["task_id"] == "t-1"
    assert [(r.getMessage(), getattr(r, "task_id", None)) for r in seen] == [("accepted", "t-1")]


def _json_as_a_dict_was(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The JSON line as the formatter wrote it before it was written piece by piece."""
    line: dict[str, object] = {
        "time": formatter._clock(record),  # type: ignore[attr-defined]
        "level": record.levelname.lower(), "logger": record.name,
        "event": logs.scrub(record.getMessage()),
    }  # fmt: skip
    for name in logs.FIELDS:
        value = record.__dict__.get(name)
        if value is not None and value != "-":
            line[name] = logs.scrub(value) if isinstance(value, str) else value
    if record.exc_text:
        line["exc"] = logs.scrub(record.exc_text)
    return json.dumps(line, separators=(",", ":"), default=str)


_VALUES = st.one_of(
    st.none(), st.text(), st.integers(), st.floats(), st.booleans(), st.just("-"),
    st.sampled_from(list(Priority)), st.sampled_from(list(HTTPStatus)), st.lists(st.text()),
)  # fmt: skip


@given(
    event=st.text(), name=st.text(min_size=1), level=st.sampled_from([10, 20, 30, 40, 35]),
    fields=st.dictionaries(st.sampled_from(logs.FIELDS), _VALUES), exc=st.none() | st.text(),
    created=st.floats(min_value=0, max_value=4e9),
)  # fmt: skip
def test_a_json_line_is_what_the_json_encoder_writes_for_it(
    event: str, name: str, level: int, fields: dict[str, object], exc: str | None, created: float
) -> None:
    line = (created, name, level, event, fields)
    record = logs.as_record(line)
    formatter = logs.JsonFormatter()
    if exc is None:  # a log_line carries no traceback
        assert formatter.format_line(line) == _json_as_a_dict_was(formatter, record)
    record.exc_text = exc

    assert formatter.format(record) == _json_as_a_dict_was(formatter, record)


@given(created=st.floats(min_value=0, max_value=4e9))
def test_a_line_time_is_rfc_3339_utc_with_the_records_milliseconds(created: float) -> None:
    # The milliseconds as LogRecord.msecs has them: int((created - int(created)) * 1000).
    second = int(created)
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    assert logs.JsonFormatter()._clock.at(created) == (
        f"{expected}.{int((created - second) * 1000):03d}Z"
    )


def test_a_blocked_stream_never_blocks_a_log_call_and_loses_nothing(
    pipeline: tuple[LogPipeline, Lines],
) -> None:
    _, stream = pipeline
    stream.open.clear()  # the reader stalls: every write blocks

    def log_2000() -> None:
        for n in range(2000):
            log.info("n %d", n)

    caller = threading.Thread(target=log_2000)
    caller.start()
    caller.join(BOUND)
    assert not caller.is_alive()  # all 2000 calls returned while nothing could be written
    assert stream.lines() == []

    stream.open.set()
    lines = _json(pipeline)
    assert [e["event"] for e in lines] == [f"n {n}" for n in range(2000)]


def test_past_its_bound_the_queue_drops_lines_and_says_how_many() -> None:
    # A stalled reader and a flood: memory must not grow without bound. What is held is the
    # queue's bound plus the batch the listener took before its write blocked (none, if the
    # flood filled the queue before the listener ran; up to MAX_BATCH, if it kept pace), so
    # the flood outruns both wherever the threads switch. Where the listener made room
    # mid-flood, a notice marks each gap just before the first line after it.
    bound = 100
    total = bound + MAX_BATCH + 50
    stream = Lines()
    stream.open.clear()
    pipeline = LogPipeline("INFO", LogFormat.JSON, stream, max_queued=bound)
    flood = logging.getLogger("emailq.test.flood")
    flood.propagate = False
    flood.addHandler(pipeline.handler)
    pipeline.listener.start()
    try:
        for n in range(total):
            flood.warning("n %d", n)
        stream.open.set()
        wait_until(lambda: pipeline.pending.qsize() == 0, what="the queue to drain")
        flood.warning("after")
        pipeline.stop()
    finally:
        flood.removeHandler(pipeline.handler)
    events = [json.loads(line)["event"] for line in stream.lines()]

    assert events[-1] == "after"
    notice = re.compile(r"(\d+) log line\(s\) dropped: the reader of this log did not keep up")
    expected, dropped = 0, 0  # the next line number due, and the lines dropped so far
    for event in events[:-1]:
        if gap := notice.fullmatch(event):
            expected += int(gap[1])  # the notice comes just before the line after its gap
            dropped += int(gap[1])
        else:
            assert event == f"n {expected}"
            expected += 1
    assert expected == total  # every line written or counted in a notice, in order
    assert dropped >= total - bound - MAX_BATCH


@pytest.mark.parametrize(
    ("backlog", "wait"),
    [(3 * logs.MAX_BATCH + 5, logs.LINGER_SECONDS), (logs.BUSY_LINES, logs.BUSY_LINGER_SECONDS)],
)
def test_a_backlog_is_written_batch_after_batch_with_no_wait_between(
    monkeypatch: pytest.MonkeyPatch, backlog: int, wait: float
) -> None:
    # The listener waits only once it has caught up: were it to wait after every full
    # batch, it could write no more than MAX_BATCH lines per wait, and a busy API would fill
    # the queue and drop lines. It waits longer after a batch of BUSY_LINES or more.
    waits: list[float] = []
    monkeypatch.setattr(logs, "time", SimpleNamespace(sleep=waits.append, gmtime=time.gmtime,
                                                      strftime=time.strftime))  # fmt: skip
    stream = Lines()
    pipeline = LogPipeline("INFO", LogFormat.JSON, stream)
    lines = logging.getLogger("emailq.test.backlog")
    lines.propagate = False
    lines.addHandler(pipeline.handler)
    try:
        for n in range(backlog):  # queued before the listener reads any
            lines.warning("n %d", n)
        pipeline.listener.start()
        wait_until(lambda: len(stream.lines()) == backlog, what="every line")
        pipeline.stop()
    finally:
        lines.removeHandler(pipeline.handler)
    assert waits == [wait]  # once, after the last batch


def test_auto_is_text_on_a_terminal_and_json_anywhere_else() -> None:
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal, io.StringIO() as plain:
        assert resolve_format(LogFormat.AUTO, terminal) is LogFormat.TEXT
        assert resolve_format(LogFormat.AUTO, plain) is LogFormat.JSON
        assert resolve_format(LogFormat.JSON, terminal) is LogFormat.JSON
        assert resolve_format(LogFormat.TEXT, plain) is LogFormat.TEXT
    os.close(primary)


def test_log_format_accepts_auto_text_json_in_any_case_and_refuses_the_rest() -> None:
    assert Settings(_env_file=None).log_format is LogFormat.AUTO  # type: ignore[call-arg]
    spaced: Any = " JSON "
    assert Settings(_env_file=None, log_format=spaced).log_format is LogFormat.JSON  # type: ignore[call-arg]
    wrong: Any = "yaml"
    with pytest.raises(ValueError, match="log_format") as refused:
        Settings(_env_file=None, log_format=wrong)  # type: ignore[call-arg]
    assert describe(refused.value) == (  # type: ignore[arg-type]
        "LOG_FORMAT: must be one of 'auto', 'text' or 'json' (got 'yaml')"
    )


# -- the end of a process: every queued line is written -------------------------------------

CHILD = """
import logging, signal, sys
from emailq.logs import configure_logging
configure_logging("INFO", "json")
log = logging.getLogger("child")
for n in range({count}):
    log.info("line %d", n)
{ending}
"""


@pytest.mark.parametrize(
    ("ending", "returncode"),
    [
        ("", 0),  # a normal exit: atexit
        ("raise RuntimeError('boom')", 1),  # an uncaught error: logged, then atexit
        # What uvicorn does after its graceful shutdown: the default handler, raised again.
        ("signal.raise_signal(signal.SIGTERM)", -signal.SIGTERM),
    ],
    ids=["exit", "uncaught", "sigterm"],
)
def test_every_line_queued_before_the_process_ends_is_written(ending: str, returncode: int) -> None:
    count = 20_000  # far more than the listener writes in the moment the exit takes
    code = CHILD.format(count=count, ending=ending)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          check=False)  # fmt: skip

    assert done.returncode == returncode, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.decode().splitlines()]
    assert [e["event"] for e in lines[:count]] == [f"line {n}" for n in range(count)]
    if ending.startswith("raise"):
        [error] = lines[count:]
        assert (error["level"], error["event"]) == ("critical", "uncaught exception")
        assert "RuntimeError: boom" in error["exc"]
    else:
        assert lines[count:] == []


# Pieces of addresses and keys, so that the texts drawn include ones scrub masks.
_PIECES = ["a", "user", "@", ".", "example.com", "eq_", "k" * 32, " ", "-", "_", "="]


@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))
def test_scrub_changes_nothing_that_needs_scrub_lets_through(text: str) -> None:
    # The JSON lines skip scrub when needs_scrub says no: the two must agree.
    if not logs.needs_scrub(text):
        assert logs.scrub(text) == text
