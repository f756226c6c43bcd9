"""emailq: a Redis-backed email queue shared by the API (server/) and the worker (worker/)."""

__version__ = "0.1.0"
