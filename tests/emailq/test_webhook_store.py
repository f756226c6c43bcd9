"""The webhook store's endpoint changes against its deliveries in flight, on a real Redis:
an attempt holds the endpoint it was claimed with, and its outcome may not act on an
endpoint that has changed since."""

from __future__ import annotations

import pytest

from emailq.models import Event, EventType
from emailq.queue import Queue
from emailq.webhooks.models import DeliveryAttempt, EndpointSpec, WebhookEvent
from emailq.webhooks.store import WebhookStore
from tests.helpers.queues import add

OLD, NEW = "https://old.example.com/hooks", "https://new.example.com/hooks"


@pytest.mark.parametrize("moved", [False, True])
async def test_a_410_disables_the_endpoint_only_at_the_url_that_answered_it(
    queue: Queue, moved: bool
) -> None:
    store = WebhookStore(queue)
    spec = EndpointSpec(url=OLD, events=[WebhookEvent.SENT])
    endpoint = await store.add_endpoint(spec, "ep_moving")
    assert endpoint is not None
    (task_id,) = await add(queue, "t")
    sent = Event(id=f"{endpoint.created_at + 1}-0", type=EventType.SENT, task_id=task_id,
                 time=endpoint.created_at + 1)  # fmt: skip
    assert await store.record([sent]) == 1
    (held,) = await store.claim(1, 30_000)  # an attempt to OLD, under way
    if moved:  # a PATCH moves the endpoint away from the url that is being retired
        await store.change_endpoint("ep_moving", {"url": NEW})
    entry = DeliveryAttempt(attempt=1, outcome="failed", status_code=410)
    applied = await store.finish(held, "failed", entry, reason="the endpoint answered 410 Gone",
                                 disable="answered 410 Gone")  # fmt: skip
    assert applied == "failed"  # the delivery failed either way: OLD said so
    after = await store.endpoint("ep_moving")
    assert after is not None
    assert after.enabled is moved
    assert after.url == (NEW if moved else OLD)
