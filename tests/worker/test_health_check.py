"""``python -m worker --check``, the compose healthcheck, against real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.ports import refused_redis_url
from tests.helpers.processes import Procs, settings_env, sigkill


def check(settings: Settings, cwd: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "worker", "--check"]
    return subprocess.run(args, env=settings_env(settings), cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_check_is_healthy_only_while_a_worker_on_this_host_heartbeats(
    procs: Procs, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # A short lease: heartbeats every third of it, "live" for three leases.
    settings = make_settings(job_lease_seconds=1)
    before = check(settings, tmp_path)
    assert (before.returncode, before.stderr.startswith("unhealthy: no heartbeat")) == (1, True)

    worker = procs.worker(settings)
    healthy = check(settings, tmp_path)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.startswith("healthy: worker on ")

    sigkill(worker)  # no goodbye: only its heartbeats' age tells
    wait_until(lambda: check(settings, tmp_path).returncode == 1, what="the check to fail")
    assert "last heartbeat" in check(settings, tmp_path).stderr


def test_check_with_redis_down_is_unhealthy_in_one_line(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with refused_redis_url() as url:
        done = check(make_settings(redis_url=url), tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("unhealthy: Redis at ")
    assert len(done.stderr.strip().splitlines()) == 1
