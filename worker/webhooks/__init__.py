"""The webhook dispatcher: its own process (``python -m worker.webhooks``), apart from the
mail workers. Receivers that are slow, down or hostile then cost webhook deliveries only:
never a mail worker's event loop, connections or SMTP sends; it scales on its own (one is
plenty for most installations, several share the work through the consumer group); and it
can run where the network lets it reach the receivers but nothing internal (SSRF)."""
