"""The ``emailq`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from emailq.cli.commands import Context
    from emailq.cli.output import Output
    from emailq.settings import Settings
    from emailq.templates import Templates

# Only what parsing needs is imported at the top: each command pulls in what it runs, so
# `emailq dev` and `emailq capture` stay light.
Command = Callable[["Context"], Awaitable[int]]


def _variable(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name, value


def _add_send(sub: Any, common: argparse.ArgumentParser) -> None:
    send = sub.add_parser("send", parents=[common], help="queue a message, or a file of them")
    send.add_argument("--file", metavar="PATH", help="one send request JSON per line ('-': stdin)")
    send.add_argument("--to")
    send.add_argument("--subject")
    send.add_argument("--body")
    send.add_argument("--username", help="fills {username} in subject and body")
    send.add_argument("--html", help="an HTML alternative to --body")
    send.add_argument("--cc", action="append", metavar="ADDR", help="repeatable")
    send.add_argument("--bcc", action="append", metavar="ADDR", help="repeatable")
    send.add_argument("--reply-to", metavar="ADDR")
    send.add_argument("--var", action="append", type=_variable, metavar="NAME=VALUE",
                      help="fills {NAME}, or a template's {{ NAME }}; repeatable")  # fmt: skip
    send.add_argument("--template", metavar="NAME",
                      help="a stored template (TEMPLATES_DIR), for --subject/--body")  # fmt: skip
    send.add_argument("--priority", choices=["high", "default", "low"])
    send.add_argument("--send-at", metavar="RFC3339", help="e.g. 2030-01-01T09:00:00+09:00")
    send.add_argument("--ttl", type=int, metavar="SECONDS", help="not sent after this long")
    send.add_argument("--expires-at", metavar="RFC3339", help="not sent after this time")
    _add_message_fields(send)


def _add_message_fields(send: argparse.ArgumentParser) -> None:
    """The fields Resend and Postmark users expect: sender, attachments, labels."""
    send.add_argument("--from", dest="from_", metavar="'NAME <ADDR>'",
                      help="the sender (default: MAIL_FROM); within ALLOWED_SENDERS")  # fmt: skip
    send.add_argument("--attach", action="append", metavar="PATH", help="a file; repeatable")
    send.add_argument("--metadata", action="append", type=_variable, metavar="KEY=VALUE",
                      help="stored with the task; repeatable")  # fmt: skip
    send.add_argument("--tag", action="append", metavar="TAG", help="repeatable")
    send.add_argument("--placeholders", choices=["on", "off"],
                      help="off: send {braces} as written, without substitution")  # fmt: skip


def _message_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``send``'s sender, attachment, label and placeholder fields, as the API takes them."""
    import base64

    attachments = None
    if args.attach:
        attachments = [{"filename": Path(path).name,
                        "content": base64.b64encode(Path(path).read_bytes()).decode()}
                       for path in args.attach]  # fmt: skip
    fields = {"from": args.from_, "attachments": attachments, "tags": args.tag,
              "metadata": dict(args.metadata) if args.metadata else None,
              "placeholders": args.placeholders}  # fmt: skip
    return {name: value for name, value in fields.items() if value is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emailq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run API, worker, Redis and an SMTP capture server locally")
    dev.add_argument("--data-dir", type=Path, default=Path(".emailq-dev"))
    # Fixed ports, so a second run and the CLI find the same Redis; a busy one is an error.
    dev.add_argument("--port", type=int, default=8000, help="API port (make dev PORT=...)")
    dev.add_argument("--smtp-port", type=int, default=1025,
                     help="SMTP capture port (make dev SMTP_PORT=...)")  # fmt: skip
    dev.add_argument("--redis-port", type=int, default=6379,
                     help="Redis port (make dev REDIS_PORT=...)")  # fmt: skip

    capture = sub.add_parser("capture", help="run only the SMTP capture server")
    capture.add_argument("--host", default="127.0.0.1")
    capture.add_argument("--port", type=int, default=1025, help="0: any free port (printed)")
    capture.add_argument("--out", type=Path, default=Path(".emailq-dev/mail"))

    keygen = sub.add_parser("keygen", help="print a new API key and its API_KEYS entry")
    keygen.add_argument("--id", default=None, metavar="NAME",
                        help="the key's id, shown in logs (default: a random one)")  # fmt: skip
    keygen.add_argument("--scope", choices=["send", "admin"], default="send")
    keygen.add_argument("--domains", metavar="A.COM,B.COM",
                        help="send only to recipients in these domains")  # fmt: skip
    keygen.add_argument("--senders", metavar="ME@A.COM,@B.COM",
                        help="the `from` addresses and @domains it may use")  # fmt: skip
    keygen.add_argument("--json", action="store_true", help="machine-readable output")

    # The queue commands talk to Redis directly (REDIS_URL ...), so they work without the API.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    _add_send(sub, common)
    status = sub.add_parser("status", parents=[common], help="show a task (exit code: status)")
    status.add_argument("task_id")
    status.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="return as soon as the task is final, or after SECONDS")  # fmt: skip
    sub.add_parser("stats", parents=[common], help="queue depths, workers, throughput")
    failed = sub.add_parser("failed", parents=[common], help="list dead letters, newest first")
    failed.add_argument("--limit", type=int, default=50)
    failed.add_argument("--offset", type=int, default=0)
    failed.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="only tasks with this tag; repeatable (all of them)")  # fmt: skip
    failed.add_argument("--metadata", action="append", type=_variable, default=[],
                        metavar="KEY=VALUE", help="only tasks with it; repeatable")  # fmt: skip
    requeue = sub.add_parser("requeue", parents=[common], help="send failed tasks again")
    requeue.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    requeue.add_argument("--all", action="store_true", help="every dead letter")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a pending or scheduled task")
    cancel.add_argument("task_id")
    return parser


def _send_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "to": args.to, "subject": args.subject, "body": args.body, "username": args.username,
        "html": args.html, "cc": args.cc, "bcc": args.bcc, "reply_to": args.reply_to,
        "variables": dict(args.var) if args.var else None, "priority": args.priority,
        "send_at": args.send_at, "ttl_seconds": args.ttl, "expires_at": args.expires_at,
        "template": args.template,
    }  # fmt: skip
    given = {name: value for name, value in fields.items() if value is not None}
    return given | _message_fields(args)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _send_command(args: argparse.Namespace, files: ExitStack) -> Command:
    from emailq.cli import commands

    if args.file is None:
        return lambda ctx: commands.send(ctx, _send_fields(args))
    source: TextIO
    if args.file == "-":
        source, total = sys.stdin, None
    else:
        total = _count_lines(args.file)
        source = files.enter_context(open(args.file, encoding="utf-8"))  # noqa: SIM115  # closed by the ExitStack
    return lambda ctx: commands.send_file(ctx, source, total)


def _command(args: argparse.Namespace, files: ExitStack) -> Command:
    """The chosen queue command, with its arguments bound."""
    from emailq.cli import commands

    if args.command == "send":
        return _send_command(args, files)
    if args.command == "status":
        return lambda ctx: commands.status(ctx, args.task_id, wait=args.wait)
    if args.command == "stats":
        return commands.stats
    if args.command == "failed":
        from emailq.labels import LabelFilter

        keep = LabelFilter.parse(args.tag, args.metadata)  # checked by _check
        return lambda ctx: commands.failed(ctx, offset=args.offset, limit=args.limit, keep=keep)
    if args.command == "requeue":
        return lambda ctx: commands.requeue(ctx, args.task_ids, every_failed=args.all)
    return lambda ctx: commands.cancel(ctx, args.task_id)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "send":
        flags = any(getattr(args, name) is not None for name in ("to", "subject", "body",
                                                                 "template"))  # fmt: skip
        if args.file is not None and flags:
            parser.error("send: give --file, or --to/--subject/--body, not both")
        content = (args.subject, args.body) if args.template is None else ()
        if args.file is None and None in (args.to, *content):
            parser.error("send: --to, --subject and --body are required (or --to and "
                         "--template, or --file)")  # fmt: skip
    if args.command == "requeue" and bool(args.task_ids) == bool(args.all):
        parser.error("requeue: give TASK_ID ... or --all")
    if args.command == "failed" and (args.limit < 1 or args.offset < 0):
        parser.error("failed: --limit must be at least 1 and --offset at least 0")
    if args.command == "failed":
        from emailq.labels import LabelFilter

        try:
            LabelFilter.parse(args.tag, args.metadata)
        except ValueError as exc:
            parser.error(f"failed: {exc}")


def _run_queue_command(args: argparse.Namespace) -> int:
    """Compose settings, queue and output for one queue command, and run it."""
    from emailq.cli.commands import ExitCode
    from emailq.cli.output import Output
    from emailq.errors import StoreFull, StoreUnavailable
    from emailq.logs import redact_url
    from emailq.startup import exit_on_config_error, load_settings

    out = Output(json_mode=args.json, stdout=sys.stdout, stderr=sys.stderr,
                 progress_bars=sys.stderr.isatty())  # fmt: skip
    with exit_on_config_error():
        settings = load_settings()
        templates = _templates(args, settings)
    with ExitStack() as files:
        try:
            command = _command(args, files)
        except OSError as exc:
            out.error(str(exc))
            return ExitCode.FAILED
        try:
            return asyncio.run(_session(settings, out, command, templates))
        except StoreFull as exc:
            # Redis answered: nothing about where it runs would help.
            out.error(f"{exc} (Redis at {redact_url(settings.redis_url)})")
            return ExitCode.UNAVAILABLE
        except StoreUnavailable as exc:
            # Name the URL tried: the usual cause is a REDIS_URL that points elsewhere.
            out.error(f"{exc} at REDIS_URL={redact_url(settings.redis_url)}; is Redis "
                      "running there? (`make dev` prints the REDIS_URL to export)")  # fmt: skip
            return ExitCode.UNAVAILABLE


def _templates(args: argparse.Namespace, settings: Settings) -> Templates | None:
    """TEMPLATES_DIR's templates for ``send`` (checked as the API checks them at startup);
    other commands never render, so a bad template does not stop ``stats`` or ``requeue``."""
    if args.command != "send":
        return None
    from emailq.templates import load_templates

    return load_templates(settings.templates_dir)


async def _session(
    settings: Settings, out: Output, command: Command, templates: Templates | None = None
) -> int:
    from emailq.cli.commands import Context
    from emailq.queue import Queue
    from emailq.submit import OperatorLimits

    # The operator's own sends have no quota owner: they draw on MAX_STORED_BYTES and the
    # headroom, never on a key's MAX_STORED_BYTES_PER_KEY (see enqueue.lua).
    queue = Queue.from_settings(
        settings,
        # Connecting stays bounded so a down Redis fails fast, but an operator's bulk step
        # may take longer to answer than the API's 503 bound allows.
        read_timeout=settings.redis_timeout_seconds + 10,
        max_connections=4,
    )
    live_window_ms = settings.live_window_ms
    try:
        limits = OperatorLimits(settings.max_body_bytes,
                                sender_allow_list=settings.sender_allow_list,
                                blocked_extensions=settings.blocked_extensions)  # fmt: skip
        return await command(Context(queue, out, limits, live_window_ms, templates=templates))
    finally:
        await queue.close()


def _keygen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Print a new key (shown once, never stored) and the API_KEYS entry holding its hash."""
    import json
    import secrets

    from emailq.apikeys import ApiKey, hash_key, new_key

    key = new_key()
    key_id = args.id or "key-" + secrets.token_hex(4)
    tail = f":{args.domains}" if args.domains else ""
    if args.senders:
        tail = f":{args.domains or ''}:{args.senders}"
    try:  # parse what we print, so a bad --id or --domains is refused, never printed
        entry = ApiKey.parse(f"{key_id}:{args.scope}:{hash_key(key)}{tail}")
    except ValueError as exc:
        parser.error(f"keygen: {exc}")
    if args.json:
        document = {"id": entry.id, "scope": entry.scope, "key": key, "entry": entry.entry()}
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        sys.stdout.write(f"key    {key}\nentry  {entry.entry()}\n")
        sys.stderr.write("Give the key to its user (it is not shown again) and add the entry to "
                         "API_KEYS (entries separated by spaces).\n")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    # Imports stay inside the branches: each command pulls in only what it runs.
    if args.command == "dev":
        from emailq.devtools.runner import DevConfig, run

        cfg = DevConfig(args.data_dir, args.port, args.smtp_port, args.redis_port)
        return run(cfg)
    if args.command == "keygen":
        return _keygen(parser, args)
    if args.command == "capture":
        from emailq.devtools.capture import serve

        serve(args.host, args.port, args.out)
        return 0
    return _run_queue_command(args)
