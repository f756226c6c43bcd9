"""Signed webhooks: endpoints, Standard Webhooks signatures, target checks, and the store
that keeps deliveries in Redis. The dispatcher process that sends them is worker.webhooks.

::

    models.py    endpoints, deliveries, and which stream events become which webhook types
    signing.py   whsec_ secrets and the Standard Webhooks signature headers
    targets.py   which URLs and addresses a webhook may reach (SSRF)
    config.py    WEBHOOKS_FILE
    store.py     endpoints and deliveries in Redis (key names come from emailq.queue.Keys)
"""
