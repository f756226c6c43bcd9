"""The ``emailq`` command."""

from __future__ import annotations

import argparse
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emailq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run API, worker, Redis and an SMTP capture server locally")
    dev.add_argument("--data-dir", type=Path, default=Path(".emailq-dev"))
    dev.add_argument("--port", type=int, default=8000, help="API port")
    dev.add_argument("--smtp-port", type=int, default=1025)
    dev.add_argument("--redis-port", type=int, default=6379)

    capture = sub.add_parser("capture", help="run only the SMTP capture server")
    capture.add_argument("--host", default="127.0.0.1")
    capture.add_argument("--port", type=int, default=1025)
    capture.add_argument("--out", type=Path, default=Path(".emailq-dev/mail"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command."""
    args = _parser().parse_args(argv)
    # Imports stay inside the branches: each command pulls in only what it runs.
    if args.command == "dev":
        from emailq.dev import DevConfig, run

        cfg = DevConfig(args.data_dir, args.port, args.smtp_port, args.redis_port)
        return run(cfg)
    from emailq.capture import serve

    serve(args.host, args.port, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
