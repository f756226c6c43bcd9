"""The benchmark table, from a result dict (bench/results/*.json)."""

from __future__ import annotations

from typing import Any


def _row(name: str, value: str, ratio: str, target: str) -> str:
    return f"| {name} | {value} | {ratio} | {target} |"


def table(r: dict[str, Any]) -> str:
    one, two, plain = r["emailq_1"], r["emailq_2"], r["plain_rate"]
    n = r["n"]
    client_calls = sum(one["drain_calls"].get(c, 0) for c in ("evalsha", "eval", "blpop"))
    client_calls += sum(one["enqueue_calls"].get(c, 0) for c in ("evalsha", "eval"))
    all_calls = sum(one["drain_calls"].values()) + sum(one["enqueue_calls"].values())
    rows = [
        f"Machine: {r['machine']}; {n} mails, concurrency {r['concurrency']}, sink: {r['sink']}",
        "",
        "| measure | value | ratio | target |",
        "|---|---|---|---|",
        _row("plain aiosmtplib loop (reference)", f"{plain:,.0f} mails/s", "1.00", ""),
        _row("emailq worker drain, 1 process", f"{one['rate']:,.0f} mails/s",
             f"{one['rate'] / plain:.2f}x plain", ">= 0.8x"),
        _row("emailq worker drain, 2 processes", f"{two['rate']:,.0f} mails/s",
             f"{two['rate'] / plain:.2f}x plain", ""),
    ]  # fmt: skip
    if r["arq_rate"]:
        rows.append(_row("arq 0.28, identical job", f"{r['arq_rate']:,.0f} mails/s",
                         f"emailq {one['rate'] / r['arq_rate']:.2f}x arq", ">= 2x"))  # fmt: skip
    enqueue = r["http"]["enqueue"]
    if "bare" in enqueue:
        bare, ours = enqueue["bare"], enqueue["emailq"]
        rows += [
            _row("bare validated POST (reference)", f"{bare['rate']:,.0f} req/s",
                 f"p50 {bare['p50_ms']:.1f} ms, p99 {bare['p99_ms']:.1f} ms", ""),
            _row("emailq enqueue POST", f"{ours['rate']:,.0f} req/s",
                 f"{ours['rate'] / bare['rate']:.2f}x bare; p50 {ours['p50_ms']:.1f} ms, "
                 f"p99 {ours['p99_ms']:.1f} ms; non-2xx {ours['non_2xx']}", ">= 0.8x"),
        ]  # fmt: skip
    lat = r["http"]["latency"]
    rows += [
        _row("end-to-end latency, idle", f"p50 {lat['idle']['p50_ms']:.1f} ms",
             f"p99 {lat['idle']['p99_ms']:.1f} ms", "p50 <= 5 ms"),
        _row(f"end-to-end latency, {lat['half_load']['rate']:.0f} mails/s",
             f"p50 {lat['half_load']['p50_ms']:.1f} ms", f"p99 {lat['half_load']['p99_ms']:.1f} ms",
             "p99 <= 50 ms"),
        _row("Redis round trips per mail (enqueue + drain)", f"{client_calls / n:.2f}", "",
             "<= 4"),
        _row("Redis commands per mail (incl. inside scripts)", f"{all_calls / n:.1f}", "", ""),
        _row("Redis memory per queued mail", f"{one['memory_per_queued']:,.0f} B", "", ""),
        _row("Redis memory per finished status", f"{one['memory_per_finished']:,.0f} B", "", ""),
        _row("worker RSS after the run", f"{one['rss_mb']:.0f} MB", "", "<= 80 MB"),
    ]  # fmt: skip
    return "\n".join(rows)
