"""Probes for orchestrators."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import QueueDep
from server.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> Health:
    """Liveness: the process answers."""
    return Health()


@router.get("/ready")
async def ready(queue: QueueDep) -> Ready:
    """Readiness: Redis answers (503 otherwise)."""
    await queue.ping()
    return Ready()
