"""The README's Metrics section agrees with the code: every series either process exports
is in its table (and nothing else is), its YAML examples parse, and the KEDA example
watches the lane lists by their real key names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from emailq.models import LANES, LaneStats, QueueGauges
from emailq.queue import Keys
from server.metrics import ApiMetrics, queue_families
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]


def _exported() -> set[str]:
    gauges = QueueGauges(lanes=[LaneStats(priority=lane, depth=0, oldest_age_seconds=None)
                                for lane in LANES], scheduled=0, in_flight=0, failed=0,
                         stored_bytes=0, memory_used_bytes=0, memory_max_bytes=0)  # fmt: skip
    families = [*ApiMetrics().registry.collect(), *queue_families(gauges),
                *WorkerMetrics().registry.collect()]  # fmt: skip
    # Counters are named without `_total` in the registry and with it in the text.
    return {f.name + ("_total" if f.type == "counter" else "") for f in families
            if f.name.startswith("emailq_")}  # fmt: skip


def test_the_metric_table_lists_exactly_what_is_exported() -> None:
    listed = set(re.findall(r"^\| `(emailq_\w+)` \|", _section(), flags=re.MULTILINE))
    assert listed == _exported()


def _yaml_blocks() -> list[Any]:
    return [yaml.safe_load(block) for block in
            re.findall(r"```yaml\n(.*?)```", _section(), flags=re.DOTALL)]  # fmt: skip


def test_the_examples_parse_and_the_scaler_watches_every_lane_list() -> None:
    scrape, alerts, scaled = _yaml_blocks()
    assert {job["job_name"] for job in scrape["scrape_configs"]} == {"emailq-api",
                                                                     "emailq-worker"}  # fmt: skip
    rules = alerts["groups"][0]["rules"]
    assert len(rules) == 4
    # Each alert reads series that exist (a renamed gauge would leave one silent forever).
    used = {name for rule in rules for name in re.findall(r"emailq_\w+", rule["expr"])}
    assert used <= _exported()
    assert scaled["kind"] == "ScaledObject"
    watched = [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]]
    assert watched == [Keys().lane(lane) for lane in LANES]
    assert scaled["spec"]["minReplicaCount"] >= 1  # scheduled mail needs a running worker
