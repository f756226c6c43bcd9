"""The original flow on each production topology, and a Sentinel failover under load.

Every topology is started from the suite's redis-server binary (tests/helpers/topologies):
TLS with a client certificate, an ACL user, a master + replica + three sentinels. The API
and the worker run as real processes, as the README runs them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme

from emailq.cli.main import main as cli_main
from emailq.devtools.redis_server import RedisServer
from emailq.errors import StoreUnavailable
from emailq.queue import Queue
from emailq.settings import Settings
from tests.helpers.polling import read_log, wait_until
from tests.helpers.ports import refused_port
from tests.helpers.processes import Procs, sigkill
from tests.helpers.smtpd import SmtpServer
from tests.helpers.topologies import (
    SentinelSet,
    acl_node,
    needs_tls,
    sentinel_set,
    tls_files,
    tls_node,
)

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-pa55"  # noqa: S105  # a test's; never to appear in an error line or log


def original_flow(procs: Procs, settings: Settings, smtp: SmtpServer) -> None:
    """POST /api/v1/email/received -> worker -> aiosmtpd -> GET result: success."""
    base = procs.api(settings)
    procs.worker(settings)
    mail = {"to": "user@example.com", "subject": "Hi", "body": "Hello"}
    answer = httpx.post(f"{base}/api/v1/email/received", json=mail, timeout=10)
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["task_id"]

    def settled() -> bool:
        got = httpx.get(f"{base}/api/v1/email/result", params={"task_id": task_id})
        return bool(got.json().get("status") == "success")

    wait_until(settled, what="the mail sent")
    assert smtp.handler.task_ids() == [task_id]


# -- TLS and ACL ---------------------------------------------------------------------------


@needs_tls
@pytest.mark.serial  # TLS handshakes under load outlast the 0.5 s Redis timeout
def test_tls_with_ca_and_client_certificate_runs_the_flow(
    tmp_path: Path, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    files = tls_files(trustme.CA(), tmp_path / "tls")
    node = tls_node(tmp_path / "redis", files)
    try:
        settings = make_settings(
            redis_url=f"rediss://127.0.0.1:{node.extra_port}/0",
            redis_tls_ca_file=files.ca, redis_tls_cert_file=files.client_cert,
            redis_tls_key_file=files.client_key,
        )  # fmt: skip
        original_flow(procs, settings, smtp)
    finally:
        node.stop()


@needs_tls
async def test_tls_with_the_wrong_ca_or_no_client_certificate_is_unavailable_saying_why(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    files = tls_files(trustme.CA(), tmp_path / "tls")
    other = tls_files(trustme.CA(), tmp_path / "other")
    node = tls_node(tmp_path / "redis", files)
    url = f"rediss://127.0.0.1:{node.extra_port}/0"
    try:
        wrong_ca = make_settings(redis_url=url, redis_tls_ca_file=other.ca,
                                 redis_tls_cert_file=files.client_cert,
                                 redis_tls_key_file=files.client_key)  # fmt: skip
        no_client_cert = make_settings(redis_url=url, redis_tls_ca_file=files.ca)
        for settings in (wrong_ca, no_client_cert):
            queue = Queue.from_settings(settings)
            try:
                with pytest.raises(StoreUnavailable) as refused:
                    await queue.ping()
            finally:
                await queue.close()
            assert "TLS failed" in str(refused.value) or "Connection" in str(refused.value)
        # Verification off gets through a wrong CA (and says so in the log, see redisconn).
        unverified = make_settings(redis_url=url, redis_tls_ca_file=other.ca,
                                   redis_tls_cert_file=files.client_cert,
                                   redis_tls_key_file=files.client_key,
                                   redis_validate_certs=False)  # fmt: skip
        queue = Queue.from_settings(unverified)
        try:
            await queue.ping()
        finally:
            await queue.close()
    finally:
        node.stop()


def test_acl_user_runs_the_flow_and_a_wrong_password_is_one_line(
    tmp_path: Path, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    node = acl_node(tmp_path / "redis", "mailer", SECRET)
    try:
        url = f"redis://mailer:{SECRET}@127.0.0.1:{node.port}/0"
        original_flow(procs, make_settings(redis_url=url), smtp)
        for proc in procs.started:
            assert SECRET not in Path(proc.log_path).read_text()  # type: ignore[attr-defined]

        monkeypatch.setenv("REDIS_URL", f"redis://mailer:wrong-{SECRET}@127.0.0.1:{node.port}/0")
        monkeypatch.chdir(tmp_path)  # no .env file
        capsys.readouterr()
        code = cli_main(["stats"])
        err = capsys.readouterr().err
    finally:
        node.stop()
    assert code == 4
    assert len(err.strip().splitlines()) == 1, err
    assert "login refused" in err
    assert SECRET not in err


# -- Sentinel ------------------------------------------------------------------------------


def test_sentinel_with_its_own_password_runs_the_flow(
    tmp_path: Path, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    with sentinel_set(tmp_path / "redis", sentinel_password=SECRET) as topo:
        settings = make_settings(redis_url=topo.url, redis_sentinel_password=SECRET)
        original_flow(procs, settings, smtp)
        for proc in procs.started:
            assert SECRET not in Path(proc.log_path).read_text()  # type: ignore[attr-defined]


async def test_no_sentinel_reachable_or_a_wrong_sentinel_password_is_unavailable(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    with refused_port() as one, refused_port() as two:
        hosts = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in (one, two))
        queue = Queue.from_settings(make_settings(redis_url=f"redis+sentinel://{hosts}/mymaster"))
        try:
            with pytest.raises(StoreUnavailable, match="no master known"):
                await queue.ping()
        finally:
            await queue.close()
    with sentinel_set(tmp_path / "redis", sentinel_password=SECRET) as topo:
        settings = make_settings(redis_url=topo.url, redis_sentinel_password="x")  # noqa: S106
        queue = Queue.from_settings(settings)
        try:
            with pytest.raises(StoreUnavailable, match="no master known") as refused:
                await queue.ping()
        finally:
            await queue.close()
        assert SECRET not in str(refused.value)


# -- failover under load -------------------------------------------------------------------


@dataclass
class Load:
    """Posts one mail after another until stopped; records every answer."""

    base: str
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, task id or '')
    errors: list[str] = field(default_factory=list)  # no HTTP answer at all
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    got = client.post("/api/v1/email/received", json={
                        "to": "user@example.com", "subject": f"n{n}", "body": "Hi"})  # fmt: skip
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                task = got.json().get("task_id", "") if got.status_code == 202 else ""
                self.answers.append((got.status_code, task))
                self.stop.wait(0.01)  # steady, not a flood: the 2-core CI box runs it

    def accepted(self) -> list[str]:
        return [task for status, task in list(self.answers) if status == 202]


def _restart_old_master(topo: SentinelSet) -> None:
    # On its own port and data: the sentinels see it come back and make it a replica of the
    # new master, so REDIS_WAIT_REPLICAS=1 can be met again.
    old = topo.master
    back = RedisServer(old.data_dir, old.port, fsync="always")
    back.start()
    topo.nodes.append(back)


def _errors_logged(procs: Procs) -> list[str]:
    """The API's error lines (a 500's traceback), to say what went wrong."""
    lines = read_log(procs.started[0]).splitlines()
    return [line[-1500:] for line in lines if '"level":"error"' in line][:2]


@pytest.mark.serial  # kill -9 under load: it makes the load, others' load skews it
@pytest.mark.parametrize("wait_replicas", [1, 0])
def test_kill_9_of_the_master_under_load(
    wait_replicas: int, tmp_path: Path, procs: Procs, make_settings: Callable[..., Settings],
    smtp: SmtpServer,
) -> None:  # fmt: skip
    with sentinel_set(tmp_path / "redis") as topo:
        settings = make_settings(redis_url=topo.url, redis_wait_replicas=wait_replicas,
                                 worker_concurrency=4, job_lease_seconds=2)  # fmt: skip
        base = procs.api(settings)
        procs.worker(settings)
        load = Load(base)
        poster = threading.Thread(target=load.run, daemon=True)
        poster.start()
        try:
            wait_until(lambda: len(load.accepted()) >= 20, what="20 mails accepted")
            old_port = topo.master.port
            assert topo.master.process is not None
            sigkill(topo.master.process)  # type: ignore[arg-type]
            wait_until(lambda: topo.master_port() not in (None, old_port),
                       what="a replica promoted", timeout=30)  # fmt: skip
            _restart_old_master(topo)
            before = len(load.accepted())
            wait_until(lambda: len(load.accepted()) >= before + 20,
                       what="20 more mails accepted after the failover", timeout=40)  # fmt: skip
        finally:
            load.stop.set()
            poster.join(timeout=15)
        accepted = load.accepted()

        def settled(task_id: str) -> bool:
            got = httpx.get(f"{base}/api/v1/email/result", params={"task_id": task_id})
            return got.status_code == 404 or got.json().get("status") == "success"

        # Lost ones (404 on the new master) are settled too: only with 0 may there be any.
        wait_until(lambda: all(settled(t) for t in accepted), what="every accepted mail "
                   "sent or known lost", timeout=40)  # fmt: skip
        delivered = Counter(smtp.handler.task_ids())
    statuses = Counter(status for status, _ in load.answers)
    lost = [t for t in accepted if t not in delivered]
    duplicated = sum(count - 1 for t, count in delivered.items() if count > 1)
    print(f"\nREDIS_WAIT_REPLICAS={wait_replicas}: answers {dict(statuses)}, accepted "
          f"{len(accepted)}, lost {len(lost)}, duplicated {duplicated}")  # fmt: skip
    assert not load.errors, load.errors[:3]
    assert set(statuses) <= {202, 503}, (statuses, _errors_logged(procs))
    assert 503 in statuses  # the failover was seen, not slept through
    # A resend follows only a claim or finish the dead master did not pass on: at most what
    # the worker had in flight, twice (one claim, one refill) at its concurrency.
    assert duplicated <= 2 * settings.worker_concurrency
    if wait_replicas:
        assert lost == []
