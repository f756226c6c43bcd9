"""``python -m server [--host H] [--port P]``: run the API under uvicorn.

The way to run the API (the Dockerfile, docker-compose.yml and ``emailq dev`` use it). It
builds the settings once and starts uvicorn with its proxy-header handling off: uvicorn
would otherwise replace the client address of every loopback peer with whatever that peer
wrote in ``X-Forwarded-For``, before the app sees it. ``TRUSTED_PROXIES`` alone decides
which proxies are believed (``server/clientaddr.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys

import uvicorn
from fastapi import FastAPI

from emailq.logs import configure_logging
from emailq.startup import exit_on_config_error, freeze_heap, load_settings
from server.deps import state_of
from server.main import create_app
from server.routes.email import MAX_WAIT_SECONDS

# On SIGTERM uvicorn stops accepting and lets open requests finish for this long: a
# `wait=` long-poll may take MAX_WAIT_SECONDS, so it should end with its answer, not a reset.
GRACEFUL_SHUTDOWN_SECONDS = MAX_WAIT_SECONDS + 5
STARTUP_FAILURE = 3  # uvicorn's own code for it (uvicorn.main.STARTUP_FAILURE)


class _Server(uvicorn.Server):
    """uvicorn's server, which tells the app when it begins to stop: uvicorn waits for
    open responses before the lifespan ends, and an endless one (the admin event stream)
    would hold the exit for the whole grace period."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state_of(self.app).stopping.set()
        await super().shutdown(sockets)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n")[0])
    # Loopback unless told otherwise: exposing the API is a decision (see README, Security).
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m server``; returns the exit code."""
    args = _parser().parse_args(argv)
    # A bad setting, FORMS_FILE or open-relay configuration: one line, exit code 2.
    with exit_on_config_error():
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        app = create_app(settings)
    state_of(app).peer_is_socket = True  # proxy_headers=False below
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        proxy_headers=False,  # TRUSTED_PROXIES decides; see the module doc
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        log_level=settings.log_level.lower(),
        # uvicorn's own lines ("running on", errors) go to our handler, in LOG_FORMAT,
        # rather than to the text handlers its default config would install.
        log_config=None,
        # Our request context middleware writes the request line, with the request id and
        # duration, at DEBUG for a success (a /health probe or a /result poll is no news)
        # and INFO for an error; uvicorn's would add a second, id-less line per request.
        access_log=False,
    )
    server = _Server(config, app)
    freeze_heap()  # the app is built: spare its heap the collector's passes while it serves
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    # uvicorn.run's exit code when it could not start (the port taken, say).
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
