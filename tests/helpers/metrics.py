"""Reading Prometheus text as the tests assert on it, and a worker process with metrics."""

from __future__ import annotations

import subprocess

import httpx
from prometheus_client.parser import text_string_to_metric_families

from emailq.devtools.redis_server import free_port
from emailq.settings import Settings
from tests.helpers.polling import read_log
from tests.helpers.processes import Procs

Samples = dict[str, float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed as PromQL prints it, labels sorted by name:
    ``emailq_queue_depth{lane="high"}``, ``emailq_live_workers``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(url: str, **headers: str) -> Samples:
    """GET a metrics page (200 required) and parse it."""
    response = httpx.get(url, headers=headers, timeout=5.0)
    assert response.status_code == 200, response.text
    return parse(response.text)


def family(samples: Samples, name: str) -> Samples:
    """The samples of one series name (any labels)."""
    return {key: value for key, value in samples.items() if key.split("{")[0] == name}


def worker_with_metrics(
    procs: Procs, settings: Settings, attempts: int = 5
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m worker`` with WORKER_METRICS_PORT on a free port, and its metrics URL.
    A port is chosen before the worker binds it, so another process may take it first:
    the worker then exits saying so, and another port is tried."""
    for _ in range(attempts):
        port = free_port()
        try:
            proc = procs.worker(settings.model_copy(update={"worker_metrics_port": port}))
        except AssertionError:
            proc = procs.started[-1]
            if "cannot listen" in read_log(proc):
                continue
            raise
        return proc, f"http://127.0.0.1:{port}/metrics"
    raise AssertionError(f"no free port for the worker's metrics in {attempts} tries")
