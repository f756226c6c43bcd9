"""Webhook endpoints and deliveries in Redis, beside the queue they follow.

Key names come from ``emailq.queue.Keys`` (the one module that knows them); every step that
touches several keys is a Lua script (``emailq/lua/webhook_*.lua``). Events are read from
the queue's stream through the consumer group ``webhooks``: Redis keeps where the group has
read to, and which events a dispatcher took without acknowledging them (its pending list),
so a dispatcher that restarts, or dies, loses nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, cast

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from emailq import labels
from emailq.errors import EventGroupLost
from emailq.models import Event, iso
from emailq.queue import Queue, event_of, store_errors
from emailq.webhooks.config import API_ID_PREFIX, MAX_ENDPOINTS
from emailq.webhooks.models import (
    FROM_STREAM,
    STATUS_AFTER,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EndpointSpec,
    Source,
    WebhookEvent,
)
from emailq.webhooks.signing import new_secret

FinishOutcome = Literal["succeeded", "retry", "failed"]
_SCRIPTS = ("create", "claim", "finish", "replay", "endpoint", "prune")
_DELIVERY_FIELDS = ("endpoint", "type", "task_id", "status", "attempts", "created_at",
                    "updated_at", "next_attempt_at", "reason", "payload", "log")  # fmt: skip


def _script(name: str) -> str:
    return (resources.files("emailq") / "lua" / f"webhook_{name}.lua").read_text()


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _first_id(stream: dict[str, Any]) -> str:
    first = stream.get("first-entry")
    return str(first[0]) if first else str(stream.get("last-generated-id", "0-0"))


def delivery_id(event: Event, endpoint_id: str) -> str:
    """The webhook-id of ``event`` for one endpoint: the same each time the event is read."""
    digest = hashlib.sha256(f"{event.id}|{event.task_id}|{endpoint_id}".encode()).digest()
    return "msg_" + base64.b32encode(digest[:20]).decode().lower()


# What Redis answers about a group or stream that is not there: a read of a missing group
# (NOGROUP), XINFO of a missing key, and a blocked XREADGROUP whose stream or group was
# deleted under it (FLUSHALL, DEL, XGROUP DESTROY: "UNBLOCKED the stream key no longer
# exists", "... the consumer group ... no longer exists"). A script's error carries the
# command's text within its own.
_GONE = ("NOGROUP", "no such key", "no longer exists")


def later_id(a: str, b: str) -> str:
    """The later of two stream entry ids."""
    return max(a, b, key=_stream_id)


@contextlib.contextmanager
def _group_lost() -> Iterator[None]:
    """Convert Redis's answer to a read of a group (or stream) that is not there."""
    try:
        yield
    except ResponseError as exc:
        if any(mark in str(exc) for mark in _GONE):
            raise EventGroupLost(f"the webhook consumer group is gone: {exc}") from exc
        raise


def payload(event: Event, kind: WebhookEvent, task: dict[str, str | None]) -> bytes:
    """The body of every attempt of one delivery: fixed when the delivery is created.
    ``task`` is the task hash's ``to`` and ``labels``; a mail without metadata or tags
    has null for them, as the README shows."""
    found = labels.decode(task.get("labels"))
    body = {
        "type": kind.value,
        "created_at": iso(event.time),
        "data": {
            "task_id": event.task_id,
            "to": task.get("to"),
            "status": STATUS_AFTER[kind].value,
            "attempts": event.attempt,
            "reason": event.reason or None,
            "smtp_code": event.code,
            "metadata": found["metadata"] or None,
            "tags": found["tags"] or None,
        },
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Claimed:
    """A delivery held for one attempt; ``token`` fences its finish."""

    id: str
    token: str
    attempt: int
    endpoint: Endpoint
    body: bytes
    task_id: str = ""  # the mail's, for the dispatcher's log lines


class WebhookStore:
    """Endpoints, deliveries and the event feed, on the queue's Redis."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue  # whose client, keys and result TTL it shares
        self.redis = queue.redis
        self.keys = queue.keys
        self.ttl_seconds = queue.result_ttl_seconds
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(_script(name)) for name in _SCRIPTS
        }

    async def _run(self, name: str, keys: list[str], args: Sequence[str | int]) -> Any:
        with store_errors():
            return await self._scripts[name](keys, list(args))

    # -- endpoints --------------------------------------------------------------------

    async def ensure_group(self, *, after: str = "$") -> None:
        """Create the consumer group at the stream's end, unless it exists: events from
        before the first endpoint or dispatcher are history, not news. ``after``: an entry
        id to read on from instead, for a group that was lost (``EventGroupLost``) while
        events came in (the stream may be new, its ids then later than any read before)."""
        with store_errors():
            try:
                await self.redis.xgroup_create(self.keys.events, self.keys.webhook_group,
                                               id=after, mkstream=True)  # fmt: skip
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def now_id(self) -> str:
        """A stream entry id for Redis's clock now: entries added from now on come after it."""
        with store_errors():
            seconds, micros = await self.redis.time()
        return f"{int(seconds) * 1000 + int(micros) // 1000}-0"

    async def endpoints(self) -> list[Endpoint]:
        """Every endpoint, file and API, ordered by id."""
        with store_errors():
            raw = cast("dict[str, str]", await self.redis.hgetall(self.keys.webhook_endpoints))
        return [Endpoint.model_validate_json(raw[k]) for k in sorted(raw)]

    async def endpoint(self, endpoint_id: str) -> Endpoint | None:
        """One endpoint, or None."""
        with store_errors():
            raw = await self.redis.hget(self.keys.webhook_endpoints, endpoint_id)
        return None if raw is None else Endpoint.model_validate_json(raw)

    async def _now_ms(self) -> int:
        with store_errors():
            seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def add_endpoint(self, spec: EndpointSpec, endpoint_id: str) -> Endpoint | None:
        """Register an API endpoint (a secret generated if none given); None when
        MAX_ENDPOINTS are registered already."""
        await self.ensure_group()
        endpoint = Endpoint(**spec.model_dump(), id=endpoint_id, source=Source.API,
                            created_at=await self._now_ms())  # fmt: skip
        if not endpoint.secrets:
            endpoint.secrets = [new_secret()]
        with store_errors():
            if await self.redis.hlen(self.keys.webhook_endpoints) >= MAX_ENDPOINTS:
                return None
            await self.redis.hsetnx(self.keys.webhook_endpoints, endpoint.id,
                                    endpoint.model_dump_json(exclude_none=True))  # fmt: skip
        return endpoint

    async def delete_endpoint(self, endpoint_id: str) -> Literal["deleted", "missing", "file"]:
        """Remove an API endpoint and its delivery lists (pending ones fail at their next
        attempt). File endpoints are the file's: 'file'."""
        endpoint = await self.endpoint(endpoint_id)
        if endpoint is None:
            return "missing"
        if endpoint.source is Source.FILE:
            return "file"
        with store_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(self.keys.webhook_endpoints, endpoint_id)
            pipe.delete(self.keys.webhook_index(endpoint_id), self.keys.webhook_failed(endpoint_id))
            await pipe.execute()
        return "deleted"

    async def enable_endpoint(self, endpoint_id: str) -> bool:
        """Send to a disabled endpoint again; False if there is none."""
        return bool(await self._run("endpoint", [self.keys.webhook_endpoints],
                                    ["enable", endpoint_id]))  # fmt: skip

    async def change_endpoint(
        self, endpoint_id: str, changes: Mapping[str, Any]
    ) -> Endpoint | Literal["missing", "file"]:
        """Replace the ``changes`` fields (``EndpointChange.changes``) of an API endpoint:
        the dispatcher uses them from its next attempt. File endpoints are the file's."""
        return await self._changed("change", endpoint_id, json.dumps(changes))

    async def rotate_secret(self, endpoint_id: str) -> Endpoint | Literal["missing", "file"]:
        """Give an API endpoint a new secret, signing first; the newest old one keeps
        signing beside it until a change drops it (older ones go now)."""
        return await self._changed("rotate", endpoint_id, new_secret())

    async def _changed(
        self, op: str, endpoint_id: str, argument: str
    ) -> Endpoint | Literal["missing", "file"]:
        answer = await self._run("endpoint", [self.keys.webhook_endpoints],
                                 [op, endpoint_id, argument])  # fmt: skip
        if answer == "missing" or answer == "file":
            return cast('Literal["missing", "file"]', answer)
        return Endpoint.model_validate_json(answer)

    async def sync_file(self, endpoints: Sequence[Endpoint]) -> list[str]:
        """Make the file's endpoints the registered file endpoints; returns the ids an API
        endpoint holds already (those stay the API's)."""
        if endpoints:
            await self.ensure_group()
        entries = [e.model_dump(mode="json", exclude_none=True) for e in endpoints]
        conflicts = await self._run("endpoint", [self.keys.webhook_endpoints],
                                    ["sync", json.dumps(entries)])  # fmt: skip
        return [str(c) for c in conflicts]

    # -- events -----------------------------------------------------------------------

    @staticmethod
    def _events(rows: Any) -> tuple[list[Event], list[str]]:
        """Parsed events, and ids whose entries were trimmed meanwhile (to acknowledge)."""
        events, gone = [], []
        for entry_id, fields in rows:
            if fields:
                events.append(event_of(entry_id, fields))
            else:
                gone.append(entry_id)
        return events, gone

    async def read_events(self, consumer: str, count: int, block_ms: int) -> list[Event]:
        """New events for this consumer (up to ``count``, waiting up to ``block_ms``)."""
        streams: Any = {self.keys.events: ">"}
        with store_errors(), _group_lost():
            reply: Any = await self.redis.xreadgroup(self.keys.webhook_group, consumer, streams,
                                                     count, block_ms)  # fmt: skip
        events, _ = self._events(reply[0][1] if reply else [])
        return events

    async def reclaim_events(self, consumer: str, min_idle_ms: int, count: int) -> list[Event]:
        """Events another dispatcher took and held longer than ``min_idle_ms`` without
        acknowledging them (it died): now this consumer's."""
        with store_errors(), _group_lost():
            reply = await self.redis.xautoclaim(self.keys.events, self.keys.webhook_group,
                                                consumer, min_idle_ms, "0-0", count)  # fmt: skip
        events, gone = self._events(reply[1])
        if gone:
            with store_errors():
                await self.redis.xack(self.keys.events, self.keys.webhook_group, *gone)
        return events

    async def unread_trimmed(self) -> int | None:
        """How many events the stream's cap trimmed before the group read them: 0 when none,
        None when Redis cannot tell (its lag is unknown after an XDEL)."""
        with store_errors(), _group_lost():
            stream = await self.redis.xinfo_stream(self.keys.events)
            groups = await self.redis.xinfo_groups(self.keys.events)
        group = next((g for g in groups if g["name"] == self.keys.webhook_group), None)
        if group is None or group.get("lag") is None:
            return None if group is not None else 0
        # lag counts every entry added since the group's position; those still in the
        # stream after it are the ones left to read, the rest were trimmed unread.
        if _stream_id(group["last-delivered-id"]) >= _stream_id(_first_id(stream)):
            return 0
        return max(int(group["lag"]) - int(stream["length"]), 0)

    async def prune_consumers(self, idle_ms: int) -> list[str]:
        """Delete the group's consumers idle ``idle_ms`` or more with nothing pending (dead
        dispatchers); returns their names. A live one reads every few seconds."""
        with _group_lost():
            gone = await self._run("prune", [self.keys.events],
                                   [self.keys.webhook_group, idle_ms])  # fmt: skip
        return [str(name) for name in gone]

    async def leave_group(self, consumer: str) -> bool:
        """Delete ``consumer`` from the group if nothing is pending for it (a clean stop)."""
        with store_errors(), _group_lost():
            rows = await self.redis.xinfo_consumers(self.keys.events, self.keys.webhook_group)
            mine = [r for r in rows if r.get("name") == consumer]
            if not mine or int(mine[0].get("pending", 0)) != 0:
                return False
            await self.redis.xgroup_delconsumer(self.keys.events, self.keys.webhook_group,
                                                consumer)  # fmt: skip
        return True

    async def _tasks(self, events: Sequence[Event]) -> dict[str, dict[str, str | None]]:
        fields = ["to", "labels"]
        ids = list(dict.fromkeys(e.task_id for e in events))
        with store_errors():
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self.keys.task(task_id), fields)
            rows = await pipe.execute()
        return {t: dict(zip(fields, row, strict=True)) for t, row in zip(ids, rows, strict=True)}

    async def record(self, events: Sequence[Event]) -> int:
        """Create each event's deliveries (one per endpoint that wants it) and acknowledge
        the events, in one step; returns how many deliveries were created."""
        if not events:
            return 0
        endpoints = await self.endpoints()
        tasks = await self._tasks(events)
        items = []
        for event in events:
            kind = FROM_STREAM.get(event.type)
            wanting = [e for e in endpoints if kind is not None and e.wants(kind, event.time)]
            if kind is None or not wanting:
                continue
            body = payload(event, kind, tasks[event.task_id]).decode()
            items += [{"id": delivery_id(event, e.id), "endpoint": e.id, "type": kind.value,
                       "task_id": event.task_id, "payload": body, "event_id": event.id}
                      for e in wanting]  # fmt: skip
        keys = [self.keys.events, self.keys.webhook_due]
        args: list[str | int] = [self.keys.webhook_group, self.keys.webhook_delivery_prefix,
                self.keys.webhook_index_prefix, self.ttl_seconds, json.dumps(items),
                json.dumps([e.id for e in events])]  # fmt: skip
        return int(await self._run("create", keys, args))

    # -- deliveries -------------------------------------------------------------------

    def _delivery_keys(self) -> list[str]:
        return [self.keys.webhook_due, self.keys.webhook_endpoints]

    def _delivery_args(self) -> list[str | int]:
        return [self.keys.webhook_delivery_prefix, self.keys.webhook_failed_prefix]

    async def claim(self, count: int, lease_ms: int) -> list[Claimed]:
        """Up to ``count`` due deliveries, each held for one attempt under a lease."""
        args = [*self._delivery_args(), lease_ms, count, self.ttl_seconds]
        rows = await self._run("claim", self._delivery_keys(), args)
        return [Claimed(id=str(i), token=str(token), attempt=int(attempt),
                        endpoint=Endpoint.model_validate_json(raw), body=str(body).encode(),
                        task_id=str(task_id))
                for i, token, attempt, raw, body, task_id in rows]  # fmt: skip

    async def next_due_ms(self) -> int | None:
        """Milliseconds until the earliest due delivery (0 if one is due), None if none."""
        with store_errors():
            first = await self.redis.zrange(self.keys.webhook_due, 0, 0, withscores=True)
        if not first:
            return None
        return max(0, int(first[0][1]) - await self._now_ms())

    async def finish(
        self, held: Claimed, outcome: FinishOutcome, entry: DeliveryAttempt, *,
        retry_in_ms: int = 0, reason: str = "", disable: str = "",
    ) -> str:  # fmt: skip
        """Record one attempt; returns the outcome applied, or 'stale' (no longer ours).
        ``disable`` disables the endpoint, if its url is still the one attempted."""
        args = [*self._delivery_args(), held.id, held.token, outcome,
                entry.model_dump_json(exclude_none=True), retry_in_ms, self.ttl_seconds,
                reason, disable, held.endpoint.url]  # fmt: skip
        return str(await self._run("finish", self._delivery_keys(), args))

    async def replay(self, endpoint_id: str, msg_id: str) -> str:
        """Deliver a finished delivery again: 'replayed', 'missing', 'pending', 'disabled'."""
        return str(await self._run("replay", self._delivery_keys(),
                                   [*self._delivery_args(), msg_id, endpoint_id]))  # fmt: skip

    async def _read(self, ids: Sequence[str]) -> list[Delivery]:
        with store_errors():
            pipe = self.redis.pipeline(transaction=False)
            for msg_id in ids:
                pipe.hmget(self.keys.webhook_delivery(msg_id), list(_DELIVERY_FIELDS))
            rows = await pipe.execute()
        found = []
        for msg_id, row in zip(ids, rows, strict=True):
            raw = dict(zip(_DELIVERY_FIELDS, row, strict=True))
            if raw["status"] is None:
                continue
            values = {k: v for k, v in raw.items() if v is not None}
            values["payload"] = json.loads(values["payload"])
            values["log"] = json.loads(values.get("log") or "[]")
            found.append(Delivery.model_validate({"id": msg_id, "endpoint_id": raw["endpoint"],
                                                  **values}))  # fmt: skip
        return found

    async def delivery(self, endpoint_id: str, msg_id: str) -> Delivery | None:
        """One delivery of one endpoint, or None."""
        found = await self._read([msg_id])
        return found[0] if found and found[0].endpoint_id == endpoint_id else None

    async def deliveries(
        self, endpoint_id: str, status: DeliveryStatus | None, *, offset: int, limit: int
    ) -> list[Delivery]:
        """An endpoint's deliveries, newest first: the failed ones from their own list,
        others filtered from the page of all (so such a page may hold fewer)."""
        key = (self.keys.webhook_failed(endpoint_id) if status is DeliveryStatus.FAILED
               else self.keys.webhook_index(endpoint_id))  # fmt: skip
        with store_errors():
            ids = await self.redis.zrevrange(key, offset, offset + limit - 1)
        found = await self._read([str(i) for i in ids])
        return [d for d in found if status is None or d.status is status]


def new_endpoint_id() -> str:
    """An unguessable id for an API endpoint."""
    return API_ID_PREFIX + secrets.token_hex(12)
