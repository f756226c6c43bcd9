"""The worker process: claims jobs from Redis and sends them over SMTP."""
