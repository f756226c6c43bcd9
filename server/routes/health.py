"""Probes for orchestrators."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import QueueDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(queue: QueueDep) -> dict[str, str]:
    """Readiness: Redis answers (503 otherwise)."""
    await queue.ping()
    return {"status": "ready"}
