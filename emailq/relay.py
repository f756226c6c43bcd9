"""What workers keep in Redis about the relay: deferred mail, the shared send rate, and
each worker's circuit breaker state for the stats.

Key names come from ``Keys`` (emailq.queue, the one place they are made). Redis errors are
converted to ``StoreUnavailable`` here, where they enter, as in the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from emailq.models import LANES, Attempt, ClaimedJob
from emailq.queue import Queue, _load_script, _store_errors

SWEEP_LIMIT = 500  # lane entries one expire_waiting call may remove: short script calls


@dataclass(frozen=True)
class Deferral:
    """How a relay-level failure gives its task back."""

    reason_if_expired: str  # the task's failure reason, if its outage clock ran out
    ceiling_ms: int  # SMTP_OUTAGE_MAX_SECONDS
    delay_ms: int = 0  # 0: front of its lane at once; else scheduled this much later


class RelayStore:
    """Redis operations about the relay, on the queue's client and keys."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.keys = queue.keys
        redis = queue.redis
        self._defer = redis.register_script(_load_script("defer"))
        self._expire = redis.register_script(_load_script("expire_waiting"))
        lua = resources.files("emailq") / "lua"
        self._rate = redis.register_script((lua / "send_rate.lua").read_text())
        self._state = redis.register_script((lua / "relay_state.lua").read_text())

    async def defer(self, claimed: ClaimedJob, entry: Attempt, how: Deferral) -> str:
        """Give ``claimed`` back uncounted (or fail it past the ceiling): 'deferred',
        'failed', 'stale' (lease lost) or 'ignored' (no longer pending)."""
        log_entry = entry.model_dump_json(exclude_none=True)
        args: list[str | int] = [claimed.task_id, claimed.token, log_entry,
                                 how.reason_if_expired, how.ceiling_ms, how.delay_ms,
                                 self.queue.result_ttl_seconds]  # fmt: skip
        return str(await self.queue.run_script(self._defer, *args))

    async def expire_waiting(self, ceiling_ms: int, reason: str) -> int:
        """Fail ready mail that has waited ``ceiling_ms`` or longer; returns how many.
        Only for a worker whose relay has been down at least that long (see the script)."""
        total = 0
        while True:
            args: list[str | int] = [ceiling_ms, reason, self.queue.result_ttl_seconds, SWEEP_LIMIT,
                    self.queue.max_attempts, *LANES]  # fmt: skip
            failed, popped = await self.queue.run_script(self._expire, *args)
            total += int(failed)
            if int(popped) < SWEEP_LIMIT:
                return total

    async def take_send_slot(self, max_per_second: float) -> tuple[float, float]:
        """Reserve the next send slot of the shared rate: (seconds to wait, current rate)."""
        return await self._call_rate("take", max_per_second)

    async def throttled(self, max_per_second: float) -> float:
        """The relay asked us to slow down: halve the shared rate; returns the new rate."""
        return (await self._call_rate("throttle", max_per_second))[1]

    async def _call_rate(self, op: str, max_per_second: float) -> tuple[float, float]:
        with _store_errors():
            wait_ms, milli_rate = await self._rate([self.keys.relay_rate], [op, max_per_second])
        return int(wait_ms) / 1000, int(milli_rate) / 1000

    async def publish(self, worker_id: str, state: dict[str, object], ttl_ms: int) -> None:
        """Store one worker's breaker state for the stats; it lapses with the worker."""
        with _store_errors():
            await self._state([self.keys.relay_state(worker_id)], [json.dumps(state), ttl_ms])

    async def retire(self, worker_id: str) -> None:
        """Remove a stopping worker's state."""
        with _store_errors():
            await self.queue.redis.delete(self.keys.relay_state(worker_id))
