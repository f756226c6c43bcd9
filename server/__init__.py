"""The HTTP API process: accepts mail, stores it in Redis, answers status queries."""
