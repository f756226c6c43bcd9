"""Rate limits kept in Redis, so every API replica draws on the same budgets.

Two limits, each in the ``limits`` notation (``"120/minute"``; ``""`` turns it off); a 429
names the setting, its window and whose budget it was, and when to retry:

* ``RATE_LIMIT_PER_KEY`` on the send endpoints, per API key id (per client address while
  ``API_KEYS`` is unset). A batch costs its number of messages: the limit is on mail, and a
  batch must not be a way around it. Template previews have a budget of their own at the
  same rate (each renders a template; none sends mail).
* ``RATE_LIMIT_PER_FORM_ADDRESS`` per client address per contact form, through
  ``check_form_rate``.

A moving window (``limits``' exact strategy: one sorted list per budget, checked and
appended in one Lua step) so a burst at a window edge cannot double the rate. Refusals are
429 with ``Retry-After``; every answer under a limit carries the IETF draft's
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import limits
import redis.asyncio
from fastapi import HTTPException, Request, Response
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from emailq import redisconn
from emailq.errors import StoreFull, StoreUnavailable
from emailq.queue import FULL, Keys, is_out_of_memory
from emailq.rediscluster import is_cluster_url, parse_cluster_url
from emailq.redisconn import Use
from emailq.settings import Settings
from server.auth import Principal
from server.clientaddr import client_key
from server.deps import rate_limits_of

log = logging.getLogger("emailq.api")


@dataclass(frozen=True)
class Budget:
    """One configured limit: what it is called, as the operator set it, and its parsed form.

    A 429 names the setting and the window it hit, so the reader knows what to raise."""

    setting: str  # the environment name, RATE_LIMIT_PER_KEY
    text: str  # as configured, "120/minute"
    item: limits.RateLimitItem

    @classmethod
    def of(cls, setting: str, value: str) -> Budget | None:
        """The budget configured as ``value`` (settings checked its notation); None if off."""
        return cls(setting, value, limits.parse(value)) if value else None


@dataclass(frozen=True)
class Usage:
    """Where one budget stands after a request was counted against it."""

    limit: int
    remaining: int
    reset_seconds: int  # until the oldest counted request leaves the window

    @property
    def headers(self) -> dict[str, str]:
        """The RateLimit-* headers describing this budget."""
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                "RateLimit-Reset": str(self.reset_seconds)}  # fmt: skip


class RateLimits:
    """The configured limits and the Redis-backed limiter, opened in the lifespan."""

    def __init__(self, settings: Settings) -> None:
        keys = Keys(settings.redis_key_prefix)
        self._client: redisconn.Client | None = None
        self._storage = self._open(settings, keys.rate_limit_prefix)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self.per_key = Budget.of("RATE_LIMIT_PER_KEY", settings.rate_limit_per_key)
        self.per_form_address = Budget.of(
            "RATE_LIMIT_PER_FORM_ADDRESS", settings.rate_limit_per_form_address
        )

    def _open(self, settings: Settings, prefix: str) -> RedisStorage:
        timeout = settings.redis_timeout_seconds
        if is_cluster_url(settings.redis_url):
            # limits makes and owns the cluster client: the startup nodes, credentials and
            # TLS of the same URL, the same bounds as the queue's (emailq.rediscluster).
            address = parse_cluster_url(settings.redis_url)
            rest = settings.redis_url.split("://", 1)[1]
            return RedisClusterStorage(
                "async+redis+cluster://" + rest, wrap_exceptions=True,
                implementation="redispy", key_prefix=prefix, ssl=address.tls,
                **(redisconn.tls_options(settings) if address.tls else {}),
                socket_timeout=timeout, socket_connect_timeout=timeout,
                # limits hands these on to RedisCluster; its option type is too narrow.
                retry=Retry(NoBackoff(), 1),  # type: ignore[arg-type]
            )  # fmt: skip
        # A client and pool of our own, built as the queue's is for the other topologies;
        # limits takes its pool, so the URL it is given only picks its Redis code. Not the
        # queue's pool, though one could serve both: every request is counted here before
        # it is stored, a flood answered 429 included, and in the queue's pool (a blocking
        # one of 64) those round trips would hold the connections that stores and reads
        # wait for, so one client over its limit would turn other clients' sends into 503s
        # (no free connection). Apart, the 503 bound (README, "What an answer means") holds
        # whatever the limiter is asked. Bytes, as limits' own clients return them.
        client = redisconn.connect(settings, Use(timeout, decode_responses=False))
        assert isinstance(client, redis.asyncio.Redis)  # a cluster URL was handled above
        self._client = client
        return RedisStorage(
            "async+redis://",
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix=prefix,
            # limits hands this on to redis.asyncio.Redis; its option type is too narrow.
            connection_pool=client.connection_pool,  # type: ignore[arg-type]
        )

    async def close(self) -> None:
        """Close the Redis connections."""
        if self._client is not None:
            await redisconn.close(self._client)
        else:  # limits keeps the cluster client it made on its bridge, and has no close
            bridge: Any = self._storage.bridge
            await bridge.storage.aclose()

    async def hit(self, budget: Budget, *identifiers: str, whose: str, cost: int = 1) -> Usage:
        """Count ``cost`` against ``budget``; 429 when it would go over, naming the setting,
        its window and ``whose`` budget it is ("key 'website'")."""
        item = budget.item
        try:
            allowed = await self._limiter.hit(item, *identifiers, cost=cost)
            stats = await self._limiter.get_window_stats(item, *identifiers)
        except StorageError as exc:
            if is_out_of_memory(exc.storage_error):  # 507, as the store itself answers
                raise StoreFull(FULL) from exc
            why = redisconn.reason(exc.storage_error)
            raise StoreUnavailable(f"Redis is unavailable: {why}") from exc
        except RedisClusterException as exc:  # no node answers: limits does not wrap it
            raise StoreUnavailable(f"Redis is unavailable: {exc.__class__.__name__}") from exc
        usage = Usage(limit=item.amount, remaining=max(0, stats.remaining),
                      reset_seconds=max(0, math.ceil(stats.reset_time - time.time())))  # fmt: skip
        if not allowed:
            raise _too_many(budget, usage, cost, whose)
        return usage


def _too_many(budget: Budget, usage: Usage, cost: int, whose: str) -> HTTPException:
    retry_after = max(1, usage.reset_seconds)
    over = f"over {budget.setting} ({budget.text}) for {whose}"
    if cost > usage.limit:  # waiting will not help
        detail = (f"{over}: this request counts {cost} against a limit of {usage.limit}; "
                  "send fewer at a time")  # fmt: skip
    else:
        detail = f"{over}; retry in {retry_after} s"
    return HTTPException(429, detail, headers={"Retry-After": str(retry_after), **usage.headers})


async def check_key_rate(
    request: Request, response: Response, principal: Principal, *, cost: int = 1,
    use: Literal["send", "preview"] = "send",
) -> Usage | None:  # fmt: skip
    """Count a send of ``cost`` messages against the caller's RATE_LIMIT_PER_KEY budget.

    ``use="preview"``: a template preview, counted at the same rate in a budget of its own,
    so a dashboard previewing as one types takes nothing from the mail a key may send."""
    rate_limits = rate_limits_of(request)
    if rate_limits.per_key is None:
        return None
    # Without API_KEYS every caller is `anonymous`: one budget for all would let one client
    # starve the rest, so the address (an IPv6 client's /64) is the budget.
    who = ("address", client_key(request)) if principal.anonymous else ("key", principal.key_id)
    # Key ids are the operator's own names ([A-Za-z0-9_.-]); the address is the caller's own.
    whose = f"{who[0]} {who[1]!r}" if who[0] == "key" else "this address"
    if use == "preview":
        whose += "'s template previews"
    usage = await rate_limits.hit(rate_limits.per_key, use, *who, whose=whose, cost=cost)
    response.headers.update(usage.headers)
    return usage


async def check_form_rate(
    request: Request, form_id: str, response: Response | None = None
) -> Usage | None:
    """Count one submission of form ``form_id`` against the client address's budget.

    429 when over RATE_LIMIT_PER_FORM_ADDRESS; None when that limit is off. The RateLimit-*
    headers go on ``response`` when given, else take them from the returned ``Usage``.
    """
    rate_limits = rate_limits_of(request)
    if rate_limits.per_form_address is None:
        return None
    whose = f"form {form_id!r} from this address"
    budget = rate_limits.per_form_address
    usage = await rate_limits.hit(budget, "form", form_id, "address", client_key(request),
                                  whose=whose)  # fmt: skip
    if response is not None:
        response.headers.update(usage.headers)
    return usage
