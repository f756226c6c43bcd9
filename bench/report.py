"""The benchmark table, from a result dict (bench/results/*.json)."""

from __future__ import annotations

import statistics
from typing import Any

# Redis calls the client makes for emailq: every script call, and the worker's idle wait.
CLIENT_CALLS = ("evalsha", "eval", "blpop")


def _row(name: str, value: str, ratio: str, target: str) -> str:
    return f"| {name} | {value} | {ratio} | {target} |"


def round_trips(run: dict[str, Any], n: int) -> float:
    """emailq's Redis round trips per mail, enqueue + drain."""
    calls = {**run["enqueue_calls"]}
    for name, count in run["drain_calls"].items():
        calls[name] = calls.get(name, 0) + count
    return float(sum(calls.get(c, 0) for c in CLIENT_CALLS)) / n


def commands(run: dict[str, Any], n: int) -> float:
    """Redis commands per mail, counting those inside scripts and MULTI."""
    return float(sum(run["drain_calls"].values()) + sum(run["enqueue_calls"].values())) / n


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "peer")


def _twice(run: dict[str, Any]) -> str:
    extra = run.get("runs_beyond_n", 0)
    return f"; {extra} jobs run twice" if extra else ""


def best_peers(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer's fastest run, in the order the peers ran."""
    best: dict[str, dict[str, Any]] = {}
    for run in peers:
        name = run["settings"]["peer"]
        if name not in best or run["rate"] > best[name]["rate"]:
            best[name] = run
    return list(best.values())


def _drain_rows(r: dict[str, Any]) -> list[str]:
    one, two, plain = r["emailq_1"], r["emailq_2"], r["plain_rate"]
    return [
        _row(f"plain aiosmtplib loop, {r['concurrency']} connections (reference)",
             f"{plain:,.0f} mails/s", "1.00", ""),
        _row("emailq worker drain, 1 process", f"{one['rate']:,.0f} mails/s",
             _ratio_to_plain(r, "emailq_1"), ">= 0.9x"),
        _row("emailq worker drain, 2 processes", f"{two['rate']:,.0f} mails/s",
             f"{two['rate'] / plain:.2f}x plain", ""),
        *_prefetch_row(r, plain),
    ]  # fmt: skip


def _prefetch_row(r: dict[str, Any], plain: float) -> list[str]:
    ahead = r.get("emailq_1_prefetch")  # absent from runs before WORKER_PREFETCH existed
    if not ahead:
        return []
    n = ahead["settings"]["WORKER_PREFETCH"]
    return [_row(f"emailq worker drain, 1 process, WORKER_PREFETCH={n}",
                 f"{ahead['rate']:,.0f} mails/s", _ratio_to_plain(r, "emailq_1_prefetch"),
                 ">= 0.9x")]  # fmt: skip


def _ratio_to_plain(r: dict[str, Any], name: str) -> str:
    """The median of the rounds' ratios, and each (one pair only in runs before rounds)."""
    ratios = r.get("drain_ratios", {}).get(name) or [r[name]["rate"] / r["plain_rate"]]
    return f"{statistics.median(ratios):.2f}x plain{_rounds(ratios)}"


def _peer_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    one = r.get("emailq_1", {}).get("rate")
    plain = r.get("plain_rate")
    for run in best_peers(r["peers"]):
        name = f"{run['settings']['peer']} ({settings_text(run['settings'])}), identical job"
        ratio = f"emailq {one / run['rate']:.2f}x" if one else ""
        if plain:
            ratio += f"; {run['rate'] / plain:.2f}x plain"
        rows.append(_row(name, f"{run['rate']:,.0f} mails/s; "
                         f"{run['commands_per_mail']:.1f} Redis commands/mail{_twice(run)}",
                         ratio, "emailq >= 1.5x"))  # fmt: skip
    return rows


ENQUEUE_ROWS = (
    ("emailq", "emailq enqueue POST, as shipped (LOG_LEVEL=INFO)"),
    ("emailq-warning", "emailq enqueue POST, LOG_LEVEL=WARNING"),
)


def _http_rows(web: dict[str, Any]) -> list[str]:
    rows = []
    enqueue = web["enqueue"]
    if "bare" in enqueue:
        bare = enqueue["bare"]
        latency = (f"p50 {bare['p50_ms']:.1f} ms, p99 {bare['p99_ms']:.1f} ms; "
                   f"{bare['cpu_us_per_request']:.0f} us CPU a request")  # fmt: skip
        rows.append(_row("bare validated POST (reference)", f"{bare['rate']:,.0f} req/s",
                         latency, ""))  # fmt: skip
        for name, label in ENQUEUE_ROWS:
            ours = enqueue[name]
            spread = ", ".join(f"{r:.2f}" for r in ours["ratios"])
            rows.append(_row(label, f"{ours['rate']:,.0f} req/s",
                             f"{ours['ratio']:.2f}x bare (rounds: {spread}); p50 "
                             f"{ours['p50_ms']:.1f} ms, p99 {ours['p99_ms']:.1f} ms "
                             f"({ours['p99_ratio']:.2f}x bare's); "
                             f"{ours['cpu_us_per_request']:.0f} us CPU a request (bare's / "
                             f"ours: {ours['cpu_ratio']:.2f}); non-2xx {ours['non_2xx']}",
                             ">= 1.0x, p99 <= 1.5x"))  # fmt: skip
    lat = web["latency"]
    rows += [
        _row("end-to-end latency, idle", f"p50 {lat['idle']['p50_ms']:.1f} ms",
             f"p99 {lat['idle']['p99_ms']:.1f} ms", "p50 <= 5 ms"),
        _row(f"end-to-end latency, {lat['half_load']['rate']:.0f} mails/s",
             f"p50 {lat['half_load']['p50_ms']:.1f} ms", f"p99 {lat['half_load']['p99_ms']:.1f} ms",
             "p99 <= 50 ms"),
    ]  # fmt: skip
    return rows


def _cost_rows(r: dict[str, Any]) -> list[str]:
    one, n = r["emailq_1"], r["n"]
    return [
        _row("Redis round trips per mail (enqueue + drain)", f"{round_trips(one, n):.2f}", "",
             "<= 4"),
        _row("Redis commands per mail (incl. inside scripts)", f"{commands(one, n):.1f}", "", ""),
        _row("Redis memory per queued mail", f"{one['memory_per_queued']:,.0f} B", "", ""),
        _row("Redis memory per finished status", f"{one['memory_per_finished']:,.0f} B", "", ""),
        _row("worker RSS after the run", f"{one['rss_mb']:.0f} MB", "", "<= 80 MB"),
        _row("worker CPU per mail (1 process)", f"{one['cpu_us_per_mail']:.0f} us",
             f"{one['cpu_share']:.2f} cores while draining", ""),
    ]  # fmt: skip


def _rounds(ratios: list[float]) -> str:
    """Every round's ratio after the median shown, when there was more than one round."""
    if len(ratios) < 2:
        return ""
    return f" (median of rounds {', '.join(f'{x:.2f}' for x in ratios)})"


def _relay_rows(s: dict[str, Any]) -> list[str]:
    d, c, limit = f"{s['delay_ms']:g} ms", s["connections"], s["limit"]
    ours = s["emailq"]
    rows = [
        _row(f"relay {d}/reply: aiosmtplib, 1 connection (reference)",
             f"{s['one_connection_s_per_mail'] * 1000:.1f} ms/mail",
             f"limit for {c} connections: {limit:,.0f} mails/s", ""),
        _row(f"relay {d}: PIPELINING by hand, 1 connection",
             f"{s['pipelined_s_per_mail'] * 1000:.1f} ms/mail",
             f"limit for {c}: {s['pipelined_limit']:,.0f} mails/s", ""),
        _row(f"relay {d}: plain aiosmtplib loop, {c} connections, 1 process",
             f"{s['plain_rate']:,.0f} mails/s",
             f"{s['plain_rate'] / limit:.2f}x limit; CPU: sender {s['plain_cpu_share']:.2f}, "
             f"sink {s['plain_sink_cpu_share']:.2f} cores", ""),
        _row(f"relay {d}: emailq worker, 1 process, WORKER_CONCURRENCY={c}",
             f"{ours['rate']:,.0f} mails/s",
             f"**{ours['rate'] / limit:.2f}x limit**"
             f"{_rounds([rate / limit for rate in s.get('emailq_rates', [])])}; "
             f"RSS {ours['rss_mb']:.0f} MB; "
             f"{round_trips(ours, s['n']):.2f} Redis round trips/mail; CPU: worker "
             f"{ours['cpu_share']:.2f} ({ours['cpu_us_per_mail']:.0f} us/mail), "
             f"sink {s['emailq_sink_cpu_share']:.2f} cores",
             ">= 0.9x limit"),
    ]  # fmt: skip
    for name, run in (s.get("peers") or {}).items():
        if run:
            rows.append(_row(f"relay {d}: {run['settings']['peer']} "
                             f"({settings_text(run['settings'])})",
                             f"{run['rate']:,.0f} mails/s{_twice(run)}",
                             f"{run['rate'] / limit:.2f}x limit; emailq "
                             f"{ours['rate'] / run['rate']:.2f}x {name}", ""))  # fmt: skip
    return rows


def _scaling_rows(rows_in: list[dict[str, Any]]) -> list[str]:
    first = rows_in[0]["drain_rate"]
    rows = []
    for s in rows_in:
        lat = s["result_latency"]
        rows.append(_row(
            f"backlog {s['size']:,}: Redis memory per queued mail; drain of its first "
            f"{s['sample']:,}", f"{s['memory_per_queued']:,.0f} B; {s['drain_rate']:,.0f} mails/s",
            f"drain {s['drain_rate'] / first:.2f}x the {rows_in[0]['size']:,} row; GET /result "
            f"during it p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms; stored at "
            f"{s['store_rate']:,.0f}/s", ""))  # fmt: skip
    return rows


def table(r: dict[str, Any]) -> str:
    rows = [
        f"Machine: {r['machine']}; {r['n']} mails, concurrency {r['concurrency']}, "
        f"sink: {r.get('sink', '-')}",
        "",
        "| measure | value | ratio | target |",
        "|---|---|---|---|",
    ]
    if "emailq_1" in r:
        rows += _drain_rows(r)
    if r.get("peers"):
        rows += _peer_rows(r)
    if "http" in r:
        rows += _http_rows(r["http"])
    for setting in r.get("relay", []):
        rows += _relay_rows(setting)
    if r.get("scaling"):
        rows += _scaling_rows(r["scaling"])
    if "emailq_1" in r:
        rows += _cost_rows(r)
    tried = [p for p in r.get("peers", []) if p not in best_peers(r["peers"])]
    if tried:
        rows += ["", "Also run (slower): " + "; ".join(
            f"{p['settings']['peer']} {settings_text(p['settings'])}: {p['rate']:,.0f} mails/s"
            for p in tried)]  # fmt: skip
    return "\n".join(rows)
