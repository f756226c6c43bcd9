"""``DASHBOARD_READ_ONLY``: the admin API only looks. Requeue and cancel answer 403, so a
page (or anyone holding an admin key) can watch but not steer; the refusal is here, on the
server, not only a hidden button. The CLI, which talks to Redis directly, is not affected.
"""

from __future__ import annotations

from fastapi import Depends, HTTPException

from server.deps import SettingsDep


async def refuse_when_read_only(settings: SettingsDep) -> None:
    """403 while ``DASHBOARD_READ_ONLY`` is set."""
    if settings.dashboard_read_only:
        raise HTTPException(403, "DASHBOARD_READ_ONLY is set: requeue and cancel are turned "
                                 "off in the API (the emailq CLI can still do them)")  # fmt: skip


WritableDep = Depends(refuse_when_read_only)
