"""Log setup shared by the API and the worker: text or JSON lines, written off the event loop.

A log call on the event loop only builds the record, stamps it with the context of the
request or task it belongs to, and puts it on a queue (``ContextQueueHandler``). One
thread (a ``QueueListener``) formats the records and writes them, many lines per write
when they come faster than one at a time. So a line per accepted mail costs the loop a
record and a queue put, never a format, an encode or a blocking write to a slow pipe. A
line per request (the API's "accepted") goes by ``log_line``, which queues only a tuple:
the record too is made on the listener's thread.

Every line says which request and which task it is about: ``request_id``, ``task_id``,
``worker_id``, ``lane``, ``attempt``, ``smtp_code``, ``duration_ms``... (``FIELDS``),
taken from ``extra=`` or, when the call gives none, from ``bind()``: the API binds the
request id for the whole request, the worker its id for its whole run. The task stores
the request id, so one id follows a mail from the POST that accepted it to the SMTP reply
that settled it, across processes.

What never reaches a line: secrets (SMTP_PASS is a ``SecretStr``, Redis URLs are shown
through ``redact_url``, anything shaped like an API key is masked) and message content
(no log call is given a subject or body). Recipient addresses are masked to their domain
(``***@example.com``) wherever a message quotes one (a refusal, a relay's reply): logs
are shipped and kept where task records are not, and the task id leads to the address
for those allowed to read it.

The listener is stopped, and what is queued written, when the process exits (``atexit``)
or is stopped by SIGTERM (``_flush_on_sigterm``: uvicorn re-raises the signal after its
graceful shutdown, which would otherwise end the process before ``atexit`` runs).
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import logging
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from logging.handlers import QueueHandler, QueueListener
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, TextIO, cast

from emailq.settings import LogFormat

# Context a line may carry, in the order a JSON line lists them. Anything else passed in
# `extra=` is not written: a field is added here, on purpose, or not at all.
FIELDS = (
    "request_id", "task_id", "worker_id", "lane", "attempt", "smtp_code", "smtp_reply",
    "duration_ms", "http_method", "path", "http_status",
)  # fmt: skip
_IN_BRACKETS = ("request_id", "task_id")  # the text format's [req=... task=...]
# The rest as key=value, worker_id included: lines of several workers merged into one
# terminal or file (make dev, a shared log file) say which sent the mail.
_IN_TEXT = tuple(f for f in FIELDS if f not in _IN_BRACKETS)

# Lines waiting to be written are joined into one write, up to this many.
MAX_BATCH = 256
# Once it has written every line waiting, the listener waits this long before it reads
# again (BatchWriter.emit), so it takes the interpreter's lock from the event loop once per
# batch of lines, not once per line.
LINGER_SECONDS = 0.005
# ... and this long after a batch of at least BUSY_LINES (3,000 lines a second or more): at
# 5 ms the hand-overs still cost a busy API about 0.4 context switches a request, and a
# tenth of its CPU; at 50 ms, 0.05-0.1. A quiet process keeps the short wait, so its lines
# (a worker's "started") come out as they did.
BUSY_LINGER_SECONDS = 0.05
BUSY_LINES = 16
# Records waiting for the listener, at most. Past it (the reader of stderr stalled, and a
# flood of requests) lines are dropped and counted, rather than held until memory runs out
# or written at the call, which would stall the loop behind the reader.
MAX_QUEUED = 20_000

_EMPTY: Mapping[str, object] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "emailq_log_context", default=_EMPTY
)

# Arguments that are safe to format later, on the listener's thread: immutable values.
# Anything else (an object that may change, or whose __str__ is not thread-safe) is
# formatted into the message at the call, which costs that one call a format.
_PLAIN = (str, int, float, type(None))

# The local part of an address: what the RFC allows unquoted (and UTF-8 letters), before
# an "@" that starts a domain or an address literal.
_ADDRESS = re.compile(r"[\w!#$%&'*+/=?^`{|}~.\-]+@(?=[\w\[])")
_API_KEY = re.compile(r"eq_[A-Za-z0-9_\-]{16,}")  # emailq.apikeys.new_key's shape
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTES = re.compile(r"[\s\"=\x00-\x1f\x7f]")  # a text value that would not read as one


def bind(**fields: object) -> contextvars.Token[Mapping[str, object]]:
    """Add ``fields`` to every line logged from this context (this task and the tasks it
    starts) until ``unbind``: the API binds ``request_id``, the worker ``worker_id``."""
    return _CONTEXT.set(MappingProxyType({**_CONTEXT.get(), **fields}))


def unbind(token: contextvars.Token[Mapping[str, object]]) -> None:
    """Undo the ``bind`` that returned ``token``."""
    _CONTEXT.reset(token)


def needs_scrub(text: str) -> bool:
    """Whether ``scrub`` could change ``text``: the marks it looks for, which are tested
    before its regular expressions. A caller on a hot path skips ``scrub`` when this is
    False, so a new kind of secret ``scrub`` masks needs its mark here too (a property test
    holds the two together)."""
    return "@" in text or "eq_" in text


def _masked(local: re.Match[str]) -> str:
    # redact_url's "redis://***@host" is masked already: its "//***" reads as a local part
    # ('/' and '*' may be in one), and masking it again made "redis:***@host". Only that
    # form, after a scheme's colon: an address such as "//@x.com" is still masked.
    if local[0] == "//***@" and local.string[local.start() - 1 : local.start()] == ":":
        return local[0]
    return "***@"


def scrub(text: str) -> str:
    """``text`` with API keys and the local part of addresses masked."""
    if "@" in text:
        text = _ADDRESS.sub(_masked, text)
    if "eq_" in text:
        text = _API_KEY.sub("eq_***", text)
    return text


def _plain(args: object) -> bool:
    if isinstance(args, tuple):
        return all(isinstance(a, _PLAIN) for a in args)
    if isinstance(args, Mapping):
        return all(isinstance(a, _PLAIN) for a in args.values())
    return isinstance(args, _PLAIN)


class ContextQueueHandler(QueueHandler):
    """Runs on the thread that logs (the event loop): stamps the bound context on the
    record and queues it, unformatted. Replaces ``QueueHandler.prepare``, which formats
    every record at the call and copies it."""

    def __init__(
        self, q: queue.SimpleQueue[Any], writer: BatchWriter, max_queued: int = MAX_QUEUED
    ) -> None:
        super().__init__(q)
        self.pending = q
        self.writer = writer
        self.max_queued = max_queued
        self.dropped = 0
        self.direct = False  # once the listener is stopped, write at the call

    def emit(self, record: logging.LogRecord) -> None:
        # Called with this handler's lock held, so `dropped` is counted safely.
        try:
            if self.direct:
                self.writer.handle(self.prepare(record))
            else:
                self._put(record)
        except Exception:
            self.handleError(record)

    def put_line(self, line: Line) -> None:
        """Queue a ``log_line`` as it is: the listener formats it (``BatchWriter.emit_line``)."""
        with self.lock:  # type: ignore[union-attr]  # createLock made it; emit's lock too
            if self.direct:
                self.writer.emit_line(line)
            else:
                self._put(line)

    def _put(self, item: logging.LogRecord | Line) -> None:
        if self.pending.qsize() >= self.max_queued:
            self.dropped += 1
            return
        if self.dropped:
            self.pending.put_nowait(self._dropped_line())
        self.pending.put_nowait(self.prepare(item) if isinstance(item, logging.LogRecord) else item)

    def _dropped_line(self) -> logging.LogRecord:
        line = logging.makeLogRecord({
            "name": "emailq.logs", "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "%d log line(s) dropped: the reader of this log did not keep up",
            "args": (self.dropped,),
        })  # fmt: skip
        self.dropped = 0
        return line

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        attrs = record.__dict__
        for name, value in _CONTEXT.get().items():
            attrs.setdefault(name, value)  # `extra=` of the call wins
        if record.args and not _plain(record.args):
            record.msg = record.getMessage()
            record.args = None
        if record.exc_info and not record.exc_text:
            # Errors are rare: render the traceback now, while its frames are as they were.
            record.exc_text = _EXC_FORMATTER.formatException(record.exc_info)
        return record


_EXC_FORMATTER = logging.Formatter()


def _logging_started() -> float:
    """What a record's ``relativeCreated`` counts from: logging's start time, read off a
    record it makes (its own name for it is private)."""
    probe = logging.makeLogRecord({})
    return probe.created - probe.relativeCreated / 1000


_LOGGING_STARTED = _logging_started()

# A line of ``log_line``, as queued: the time of the call, the logger's name, the level, the
# event, and its fields (the call's over the bound context's).
Line = tuple[float, str, int, str, Mapping[str, object]]


def as_record(line: Line) -> logging.LogRecord:
    """The record ``logger.log(level, event, extra=fields)`` would have made at the call,
    with the bound context stamped on it (``ContextQueueHandler.prepare``): the same line
    in either format. Made on the listener's thread, by attribute, not by ``LogRecord``'s
    constructor, which reads the clock and looks up names no format of ours writes."""
    created, name, level, event, fields = line
    record = logging.LogRecord.__new__(logging.LogRecord)
    attrs = record.__dict__
    attrs.update(fields)
    attrs.update(
        name=name, msg=event, args=None, levelname=logging.getLevelName(level), levelno=level,
        pathname="(unknown file)", filename="(unknown file)", module="(unknown file)",
        exc_info=None, exc_text=None, stack_info=None, lineno=0, funcName="(unknown function)",
        created=created, msecs=int((created - int(created)) * 1000) + 0.0,
        relativeCreated=(created - _LOGGING_STARTED) * 1000,
        thread=None, threadName=None, processName=None, process=None,
    )  # fmt: skip
    return record


def log_line(logger: logging.Logger, level: int, event: str, fields: Mapping[str, object]) -> None:
    """``logger.log(level, event, extra=fields)``, for a line per request: the same line,
    but the caller's thread (the event loop) only reads the clock and the bound context and
    queues a tuple; the record is made on the listener's thread. ``event`` takes no
    arguments and ``fields`` hold plain values (str, int, float, None), formatted later.

    Whenever the line would not go to the pipeline's handler alone (no pipeline, a handler
    or filter elsewhere on the way, as pytest's capture adds), it is logged as usual."""
    if not logger.isEnabledFor(level):
        return
    pipeline = _active
    if pipeline is None or not pipeline.takes(logger, level):
        logger.log(level, event, extra=dict(fields))
        return
    context = _CONTEXT.get()
    pipeline.handler.put_line(
        (time.time(), logger.name, level, event, {**context, **fields} if context else fields)
    )


# ".000Z" to ".999Z": a line's milliseconds looked up, not formatted by a spec each time.
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


class _Clock:
    """RFC 3339 UTC with milliseconds; the part up to the second is made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, record: logging.LogRecord) -> str:
        return self.at(record.created)

    def at(self, created: float) -> str:
        """The time ``created`` (epoch seconds) as a record made then shows it."""
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        # LogRecord.msecs, as int(): int((created - int(created)) * 1000)
        millis = int((created - second) * 1000)
        return self._prefix + (_MILLIS[millis] if 0 <= millis < 1000 else f".{millis:03d}Z")


# One encoder for every line: json.dumps builds a new one for each call given options.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)
# What _JSON writes a str with (ensure_ascii): json's own function, so the text is the same.
_QUOTED: Callable[[str], str] = json.encoder.encode_basestring_ascii
_FIELD_KEYS = {name: f',"{name}":' for name in FIELDS}
MAX_HEADS = 1024  # (level, logger, event) triples whose JSON a formatter keeps


def _json_value(value: object) -> str:
    """``value`` as ``_JSON`` writes it: a str or an int at once, anything else (a float
    that may be NaN, a bool, an enum, a list) by ``_JSON`` itself."""
    kind = type(value)
    if kind is str:
        return _QUOTED(cast("str", value))
    if kind is int:
        return int.__repr__(cast("int", value))
    return _JSON.encode(value)


def _json_fields(parts: list[str], values: Mapping[str, object], names: tuple[str, ...]) -> None:
    """Append ``values``' fields ``names`` (FIELDS, or those of them a line has, in FIELDS'
    order) as _JSON writes them in an object; None and "-" are left out."""
    # Written out, not through scrub and _json_value: this runs for every field of every
    # line, and the two calls were a third of a line's cost on the listener's thread.
    for name in names:
        value = values.get(name)
        if value is None or value == "-":
            continue
        if isinstance(value, str):  # a str enum too: _JSON writes its value, as _QUOTED
            if needs_scrub(value):  # most values need none
                value = scrub(value)
            parts += (_FIELD_KEYS[name], _QUOTED(value))
        else:
            parts += (_FIELD_KEYS[name], _json_value(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per event: time, level, logger, event, the known ``FIELDS``, and
    ``exc`` (the traceback) for an error. ASCII only, so a line is a line in any pipe."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()
        self._heads: dict[tuple[int, str, str], str] = {}
        self._known: dict[tuple[str, ...], tuple[str, ...]] = {}  # format_line's names

    def format(self, record: logging.LogRecord) -> str:
        # Written piece by piece, as _JSON would write the object {time, level, logger,
        # event, fields..., exc}: building a dict and an encoder for it was most of a
        # line's cost, on a thread that shares the interpreter with the event loop.
        attrs = record.__dict__
        parts = ['{"time":"', self._clock(record), '","level":',
                 _json_value(record.levelname.lower()), ',"logger":', _json_value(record.name),
                 ',"event":', _json_value(scrub(record.getMessage()))]  # fmt: skip
        _json_fields(parts, attrs, FIELDS)
        trace = _trace(self, record)
        if trace:
            parts += (',"exc":', _json_value(scrub(trace)))
        parts.append("}")
        return "".join(parts)

    def format_line(self, line: Line) -> str:
        """What ``format(as_record(line))`` writes, without the record: a ``log_line``."""
        created, name, level, event, fields = line
        head = self._heads.get((level, name, event))
        if head is None:
            head = self._head(level, name, event)
        parts = ['{"time":"', self._clock.at(created), head]
        # Only the names the line has, in FIELDS' order: a few, where FIELDS has eleven.
        names = tuple(fields)
        known = self._known.get(names)
        if known is None:
            known = self._known_fields(names)
        _json_fields(parts, fields, known)
        parts.append("}")
        return "".join(parts)

    def _known_fields(self, names: tuple[str, ...]) -> tuple[str, ...]:
        # A log_line's field names are those of its call and of the bound context: a few
        # sets in a process, made once each.
        if len(self._known) >= MAX_HEADS:
            self._known.clear()
        known = self._known[names] = tuple(name for name in FIELDS if name in names)
        return known

    def _head(self, level: int, name: str, event: str) -> str:
        # A log_line's event is a constant of the code that logs it: a few, made once each.
        if len(self._heads) >= MAX_HEADS:
            self._heads.clear()
        head = self._heads[level, name, event] = (
            f'","level":{_json_value(logging.getLevelName(level).lower())},"logger":'
            f'{_json_value(name)},"event":{_json_value(scrub(str(event)))}'
        )
        return head


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [req=... task=...] event key=value ...``: for a person at a
    terminal. Control characters are escaped, so no value can start a line of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        attrs = record.__dict__
        req = _text_value(attrs.get("request_id"))
        task = _text_value(attrs.get("task_id"))
        parts = [f"{self._clock(record)} {record.levelname} {record.name} [req={req} "
                 f"task={task}] {_escaped(scrub(record.getMessage()))}"]  # fmt: skip
        for name in _IN_TEXT:
            value = attrs.get(name)
            if value is not None:
                parts.append(f"{name}={_text_value(value)}")
        line = " ".join(parts)
        trace = _trace(self, record)
        return f"{line}\n{scrub(trace)}" if trace else line


def _trace(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    trace = record.exc_text or ""
    if record.stack_info:
        trace = f"{trace}\n{formatter.formatStack(record.stack_info)}".lstrip("\n")
    return trace


def _escaped(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    text = scrub(str(value))
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class BatchWriter(logging.Handler):
    """On the listener's thread: formats each record, and writes when the queue is empty
    (or ``MAX_BATCH`` lines wait), so a burst of lines is one write, not one per line."""

    def __init__(self, stream: TextIO, pending: queue.SimpleQueue[Any]) -> None:
        super().__init__()
        self.stream = stream
        self._queue = pending
        self._lines: list[str] = []
        self.linger = LINGER_SECONDS

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._add(self.format(record))
        except Exception:
            self.handleError(record)

    def emit_line(self, line: Line) -> None:
        """``handle(as_record(line))``; in JSON, formatted with no record made at all."""
        formatter = self.formatter
        if not isinstance(formatter, JsonFormatter):
            self.handle(as_record(line))
            return
        self.acquire()
        try:
            self._add(formatter.format_line(line))
        except Exception:
            self.handleError(as_record(line))
        finally:
            self.release()

    def _add(self, text: str) -> None:
        self._lines.append(text)
        caught_up = self._queue.empty()
        if caught_up or len(self._lines) >= MAX_BATCH:
            busy = len(self._lines) >= BUSY_LINES
            self._write()
            if caught_up and self.linger:
                # Let lines gather before the next read: a thread woken for every line
                # takes the GIL from the event loop once per line, and each hand-over
                # costs the loop more than the line's format. Only once caught up: a
                # full batch is followed by the next at once, however many wait.
                time.sleep(max(self.linger, BUSY_LINGER_SECONDS) if busy else self.linger)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        except Exception:  # stderr closed under us at exit: nothing left to tell
            self._lines.clear()
        finally:
            self.release()

    def _write(self) -> None:
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            self.stream.write(text)
            self.stream.flush()


class _Listener(QueueListener):
    """The listener thread; it hands a ``log_line`` to the writer as it is."""

    def __init__(self, pending: queue.SimpleQueue[Any], writer: BatchWriter) -> None:
        super().__init__(pending, writer)
        self.writer = writer

    def handle(self, record: logging.LogRecord | Line) -> None:
        if isinstance(record, tuple):
            self.writer.emit_line(record)
        else:
            super().handle(record)


class LogPipeline:
    """The root logger's queue handler and the listener thread that writes its lines."""

    def __init__(
        self, level: str, fmt: LogFormat | str, stream: TextIO, max_queued: int = MAX_QUEUED
    ) -> None:
        self.format = resolve_format(LogFormat(fmt), stream)
        pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.writer = BatchWriter(stream, pending)
        self.writer.setFormatter(JsonFormatter() if self.format is LogFormat.JSON
                                 else TextFormatter())  # fmt: skip
        self.pending = pending
        self.handler = ContextQueueHandler(pending, self.writer, max_queued)
        self.listener = _Listener(pending, self.writer)
        self.level = level.upper()
        self._lock = threading.Lock()
        self._stopped = False
        self._undo: list[Callable[[], object]] = []
        # By logger name: does its line pass up to the root with no handler or filter on
        # the way (``_plain_path``)? Walked once per logger, not per line: loggers other
        # than the root are given handlers at start-up, if ever; ``configure_logging``
        # makes a new pipeline, and so a new cache. The root's handlers, which a test's
        # log capture changes at any time, are checked on every line.
        self._plain_path: dict[str, bool] = {}

    def takes(self, logger: logging.Logger, level: int) -> bool:
        """Would a line of ``logger`` at ``level`` reach this pipeline's handler, and only
        it, with no filter on the way (``log_line``'s condition for its short cut)?"""
        plain = self._plain_path.get(logger.name)
        if plain is None:
            plain = self._plain_path[logger.name] = _plain_path(logger)
        if not plain:
            return False
        root = logging.root
        handlers = root.handlers
        handler = self.handler
        return (len(handlers) == 1 and handlers[0] is handler and not root.filters
                and not handler.filters and level >= handler.level)  # fmt: skip

    def start(self) -> None:
        """Put the handler on the root logger, start the thread, and make sure it is
        stopped (its lines written) at exit, at SIGTERM, and after an uncaught error."""
        _lean_records(self._undo)
        root = logging.getLogger()
        root.setLevel(self.level)
        root.addHandler(self.handler)
        self._undo.append(lambda: root.removeHandler(self.handler))
        self.listener.start()
        logging.captureWarnings(True)  # a DeprecationWarning is a line in the same format
        self._undo.append(lambda: logging.captureWarnings(False))
        atexit.register(self.stop)
        self._undo.append(lambda: atexit.unregister(self.stop))
        hook = sys.excepthook
        sys.excepthook = log_uncaught
        self._undo.append(lambda: setattr(sys, "excepthook", hook))
        self._undo.append(_flush_on_sigterm(self))

    def stop(self) -> None:
        """Write every queued line, then write at the call from now on (lines logged
        during the rest of the exit are not lost either). Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.listener.stop()  # the thread writes everything queued before it returns
        self.handler.direct = True
        while True:  # anything queued between the listener's last read and `direct`
            try:
                self.listener.handle(self.pending.get_nowait())
            except queue.Empty:
                break
        self.writer.flush()

    def close(self) -> None:
        """``stop``, and undo what ``start`` changed (the tests' way out; a process just
        exits)."""
        self.stop()
        while self._undo:
            self._undo.pop()()


def _plain_path(logger: logging.Logger) -> bool:
    """Does a line of ``logger`` reach the root logger with no handler or filter of another
    logger on the way?"""
    node: logging.Logger | None = logger
    while node is not logging.root:
        if node is None or node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    return True


_active: LogPipeline | None = None

# What every LogRecord would otherwise look up at the call, on the event loop, and no
# format of ours writes: the caller's file and line (a walk up the stack), and the thread,
# process and task names. The logging docs' "Optimization" section names these switches.
_UNUSED_RECORD_FIELDS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing",
                         "logAsyncioTasks")  # fmt: skip


def _lean_records(undo: list[Callable[[], object]]) -> None:
    for name in _UNUSED_RECORD_FIELDS:
        if hasattr(logging, name):  # logAsyncioTasks is new in 3.12
            before = getattr(logging, name)
            setattr(logging, name, None if name == "_srcfile" else False)
            undo.append(functools.partial(setattr, logging, name, before))


def resolve_format(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """``auto``: text when ``stream`` is a terminal (a person reads it), json otherwise."""
    if fmt is not LogFormat.AUTO:
        return fmt
    isatty = getattr(stream, "isatty", None)
    return LogFormat.TEXT if isatty is not None and isatty() else LogFormat.JSON


def configure_logging(
    level: str, fmt: LogFormat | str, stream: TextIO | None = None
) -> LogPipeline:
    """Send every log line (ours, uvicorn's, warnings) to ``stream`` (stderr) in ``fmt``,
    written by a thread of its own; a second call replaces the first."""
    global _active  # one root logger per process, so one pipeline
    if _active is not None:
        _active.close()
    _active = LogPipeline(level, fmt, stream or sys.stderr)
    _active.start()
    return _active


def _flush_on_sigterm(pipeline: LogPipeline) -> Callable[[], object]:
    """On SIGTERM, write what is queued before the signal's previous handler runs.

    uvicorn restores the handler it found and raises the signal again after its graceful
    shutdown; with the default handler the process would end there, before ``atexit``,
    and its last lines ("Finished server process") with it. The worker replaces this
    handler with its own (loop.add_signal_handler) and exits normally: ``atexit`` runs.
    Returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        pipeline.stop()
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(
        signal.SIGTERM, previous if previous is not None else signal.SIG_DFL
    )


def log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: an uncaught error is one line in the log's format."""
    logging.getLogger("emailq").critical("uncaught exception", exc_info=(kind, exc, tb))


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://***@host:6379/0``; also for a list of
    hosts (``redis+sentinel://u:p@h1:26379,h2:26379/mymaster``) and a ``?password=``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    # redis-py takes any connection option from the query, a password among them.
    path = re.sub(r"((?:^|[?&])[^=&]*pass[^=&]*=)[^&]*", r"\1***", path, flags=re.IGNORECASE)
    return f"{scheme}://{netloc}{slash}{path}"
