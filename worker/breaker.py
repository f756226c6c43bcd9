"""A circuit breaker over the SMTP relay, shared by every send of one worker process.

::

    closed --relay-level failure--> open --probe due--> half_open --probe ok--> closed
                                      ^                     |
                                      +----probe failed-----+  (next probe twice as far)

A relay-level failure (unreachable, TLS, login, greeting, a drop before DATA) says
nothing about the mail, so one is enough to stop sending: the mail goes back uncounted
and the worker stops claiming until a probe (connect, TLS, login, QUIT; no mail) gets
through. Probe delays double from ``first_delay`` to ``max_delay`` and only start small
again after a mail is delivered: a relay that accepts connections but fails every send
must not be probed back into a fast open/close loop.

Pure state and clock arithmetic; the worker's ``RelayGuard`` runs the probes and logs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from emailq.models import RelayState


class CircuitBreaker:
    """State, outage start and probe schedule; ``closed`` is set while sends may go."""

    def __init__(
        self,
        *,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.first_delay = first_delay
        self.max_delay = max(max_delay, first_delay)
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = RelayState.CLOSED
        self.error: str | None = None
        # Wall clock, for operators reading the stats: when the relay last began to fail or
        # last came back. A failed probe (half_open -> open) is the same outage going on.
        self.changed_at = wall_clock()
        self.closed = asyncio.Event()
        self.closed.set()
        self._delay = first_delay
        self._opened_at = 0.0  # monotonic; when it last left closed (the outage start)
        self._probe_at = 0.0

    def failure(self, error: str) -> bool:
        """A send failed at relay level; True if that opened the breaker."""
        self.error = error
        if self.state is not RelayState.CLOSED:
            return False
        self._opened_at = self.clock()
        self._open()
        return True

    def delivered(self) -> None:
        """A mail got through: the next outage probes quickly again."""
        self._delay = self.first_delay

    def probe_due(self) -> bool:
        """Open, and the next probe's time has come."""
        return self.state is RelayState.OPEN and self.clock() >= self._probe_at

    def seconds_to_probe(self) -> float:
        """How long until the next probe is due (0 when not open)."""
        if self.state is not RelayState.OPEN:
            return 0.0
        return max(0.0, self._probe_at - self.clock())

    def probing(self) -> None:
        """A probe starts: open -> half_open."""
        self._set(RelayState.HALF_OPEN)

    def probe_failed(self, error: str) -> None:
        """half_open -> open, with the next probe twice as far off."""
        self.error = error
        self._delay = min(self.max_delay, self._delay * 2)
        self._open()

    def probe_succeeded(self) -> None:
        """half_open -> closed: sending resumes."""
        self.error = None
        self._set(RelayState.CLOSED)

    def outage_seconds(self) -> float:
        """How long the relay has been failing without a successful probe (0 when closed)."""
        return 0.0 if self.state is RelayState.CLOSED else self.clock() - self._opened_at

    def _open(self) -> None:
        # Jitter keeps the workers of a fleet from probing a recovering relay in step.
        self._probe_at = self.clock() + self._delay * random.uniform(0.8, 1.2)  # noqa: S311 (timing, not secrets)
        self._set(RelayState.OPEN)

    def _set(self, state: RelayState) -> None:
        if (state is RelayState.CLOSED) != (self.state is RelayState.CLOSED):
            self.changed_at = self.wall_clock()
        self.state = state
        if state is RelayState.CLOSED:
            self.closed.set()
        else:
            self.closed.clear()
