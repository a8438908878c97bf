"""`python -m rehearsal`: the local run of a migration between two throwaway PostgreSQL servers.

What it does today (the full state-machine rehearsal with traffic shifting, cutover and the
HTML report is the open rehearsal issue): start a source and a target server, load the
sample shop schema with a live write workload, run the preflight, start the `logical`
engine (parallel copy from the slot's snapshot, then streaming), watch lag while writes
run, stop the writes, wait until the target has applied the source's last position, sync
sequences, and compare every row. It prints progress, a summary, and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lambdas.core.catalog import list_tables
from lambdas.core.config import MigrationFileError, load_migration
from lambdas.core.db import connect
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.engines.snapshot_copy import ChunkCopied
from lambdas.core.lsn import current_lsn, wait_for_lsn
from lambdas.core.preflight import format_report, run_preflight
from lambdas.core.sequences import sync_sequences
from lambdas.core.tables import select_tables
from rehearsal import sample
from rehearsal.compare import compare_databases
from rehearsal.servers import ServerError, running_servers
from rehearsal.workload import Workload

DEFAULT_MIGRATION = Path(__file__).resolve().parent.parent / "migrations" / "local.yaml"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the sample source (default 1M)")
    parser.add_argument("--out", type=Path, default=Path("out/rehearsal"), help="folder for summary.json")
    parser.add_argument("--migration", type=Path, default=DEFAULT_MIGRATION, help="migration file (DSNs are replaced)")
    parser.add_argument("--clients", type=int, default=4, help="writer clients during the run")
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="how long to watch streaming under writes")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_migration(args.migration)
    phases: dict[str, float] = {}
    with running_servers(["rehearsal-source", "rehearsal-target"]) as (source_server, target_server):
        for server in (source_server, target_server):
            server.create_database("shop")
        src, tgt = source_server.dsn("shop"), target_server.dsn("shop")
        migration = base.model_copy(
            update={
                "source": base.source.model_copy(update={"dsn": src}),
                "target": base.target.model_copy(update={"dsn": tgt}),
            }
        )
        say(f"servers: source on port {source_server.port}, target on port {target_server.port}")

        started = time.monotonic()
        source, target = connect(src), connect(tgt)
        sample.create_schema(source)
        sample.create_schema(target)
        say(f"loading about {args.rows:,} rows into the source ...")
        sizes = sample.load_data(source, args.rows)
        phases["load_seconds"] = time.monotonic() - started

        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
        report = run_preflight(source, target, migration, wal_rate_sample_seconds=0.5)
        say(format_report(report))
        if not report.ok:
            raise SystemExit("preflight failed: fix the problems above")

        workload = Workload(src, clients=args.clients).start()
        say(f"workload: {args.clients} writer clients running on the source")
        copied = {"rows": 0, "chunks": 0}

        def on_chunk(chunk: ChunkCopied) -> None:
            copied["rows"] += chunk.rows
            copied["chunks"] += 1
            say(f"  copy: {copied['rows']:>12,} / ~{sizes.total:,} rows ({copied['chunks']} chunks)")

        plan = LogicalReplicationPlan(ReplicationNames(migration.slot_name), tuple(tables), migration.engine.logical)
        engine = LogicalEngine(src, tgt, plan, on_copy_progress=on_chunk)
        t0 = time.monotonic()
        result = engine.start()
        phases["initial_copy_seconds"] = time.monotonic() - t0
        say(
            f"initial copy: {result.rows_copied:,} rows in {result.copy_seconds:.1f}s; streaming from {result.consistent_lsn}"
        )

        lag_bytes: list[int] = []
        lag_seconds: list[float] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.stream_seconds:
            status = engine.status()
            lag_bytes.append(status.lag_bytes or 0)
            lag_seconds.append(status.lag_seconds or 0.0)
            say(
                f"  streaming: lag {status.lag_bytes} bytes, {status.lag_seconds or 0:.3f}s, slot {status.slot.wal_status if status.slot else '-'}"
            )
            time.sleep(0.5)
        stats = workload.stop()
        phases["streaming_seconds"] = time.monotonic() - t0

        t0 = time.monotonic()
        caught = wait_for_lsn(
            target, plan.names.subscription, current_lsn(source), timeout=60, source=source, slot=plan.names.slot
        )
        phases["catch_up_seconds"] = time.monotonic() - t0
        synced = sync_sequences(source, target, tables, margin=migration.cutover.sequence_margin)
        t0 = time.monotonic()
        diffs = compare_databases(src, tgt, tables)
        phases["compare_seconds"] = time.monotonic() - t0
        engine.teardown()
        source.close()
        target.close()

    differing = [d for d in diffs if not d.equal]
    return {
        "outcome": "replicated" if not differing else "differences",
        "rows_copied": result.rows_copied,
        "copy_seconds": round(result.copy_seconds, 3),
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "preflight": {c.name: c.status for c in report.checks},
        "lag_bytes": _percentiles(lag_bytes),
        "lag_seconds": _percentiles(lag_seconds),
        "catch_up": {
            "lsn": str(caught.target_lsn),
            "waited_seconds": round(caught.waited_seconds, 4),
            "signal": caught.signal,
        },
        "workload": {
            "committed": stats.committed,
            "failed": stats.failed,
            "max_latency_ms": round(stats.max_latency * 1000, 1),
        },
        "sequences_synced": len(synced),
        "rows_compared": sum(d.source_rows for d in diffs),
        "rows_lost": sum(len(d.missing_on_target) for d in diffs),
        "rows_differing": sum(len(d.changed) + len(d.extra_on_target) for d in diffs),
        "tables": {
            d.table: {"source_rows": d.source_rows, "target_rows": d.target_rows, "equal": d.equal} for d in diffs
        },
    }


def _percentiles(values: list[float] | list[int]) -> dict[str, float]:
    if not values:
        return {"p50": 0, "p99": 0, "max": 0}
    ordered = sorted(values)
    return {
        "p50": float(statistics.median(ordered)),
        "p99": float(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]),
        "max": float(ordered[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (MigrationFileError, ServerError) as exc:
        say(f"error: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    say("")
    say(f"outcome            {summary['outcome']}")
    say(f"rows copied        {summary['rows_copied']:,} in {summary['copy_seconds']}s")
    say(
        f"lag (bytes)        p50 {summary['lag_bytes']['p50']:.0f}  p99 {summary['lag_bytes']['p99']:.0f}  max {summary['lag_bytes']['max']:.0f}"
    )
    say(
        f"lag (seconds)      p50 {summary['lag_seconds']['p50']:.3f}  p99 {summary['lag_seconds']['p99']:.3f}  max {summary['lag_seconds']['max']:.3f}"
    )
    say(f"writes             {summary['workload']['committed']:,} committed, {summary['workload']['failed']} failed")
    say(f"catch-up           {summary['catch_up']['waited_seconds'] * 1000:.1f} ms ({summary['catch_up']['signal']})")
    say(
        f"rows compared      {summary['rows_compared']:,}; lost {summary['rows_lost']}, differing {summary['rows_differing']}"
    )
    say(f"summary            {args.out / 'summary.json'}")
    return 0 if summary["outcome"] == "replicated" else 1


if __name__ == "__main__":
    sys.exit(main())
