"""Initial copy: our `logical` engine against pgcopydb, on the same source in the same run.

    python -m bench.copy [--rows N] [--workers W] [--chunk-rows R] [--json]

Starts a source and two fresh targets, loads the sample shop into the source, then
- ours: creates the schema on target A (the engine, like native logical replication, needs it)
  and times `LogicalEngine.start()` until it returns (parallel copy from the slot's snapshot
  done, ANALYZE done, subscription created and enabled);
- pgcopydb: times `pgcopydb clone` of the whole database into target B (it creates the schema
  itself, so ours is compared as schema + copy);
and checks each target row for row against the source (count + ordered aggregate hash per
table); target A is checked and stopped before pgcopydb starts, so its autovacuum does not
compete for CPU. Exits non-zero if either copy differs or fails. The engine's time is broken
down (slot, chunk planning, copy, ANALYZE, CREATE SUBSCRIPTION) from timed statements on its
control sessions.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psycopg2.extensions
import psycopg2.extras

from bench.common import (
    bench_servers,
    check_quiet,
    database_size,
    default_workers,
    emit_json,
    fingerprints_of,
    log,
    mismatches,
    print_table,
    run_tool,
    server_uri,
    settle,
    ticker,
    timed,
)
from lambdas.core.config import LogicalSettings
from lambdas.core.db import Connection, connect
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.engines.snapshot_copy import ChunkCopied
from lambdas.core.tables import TableName
from rehearsal import sample

DBNAME = "shop"
GOAL_RATIO = 0.8  # ours (schema + copy) should take at most 80% of pgcopydb's time
PGCOPYDB = "pgcopydb"


# -- our engine, instrumented ------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    app: str
    text: str
    started: float  # time.monotonic()
    seconds: float

    @property
    def ended(self) -> float:
        return self.started + self.seconds


@dataclass
class EngineTrace:
    """What the engine did, seen through its sessions' cursors and its copy-progress callback."""

    total_rows: int
    statements: list[Statement] = field(default_factory=list)
    chunks: list[tuple[float, ChunkCopied]] = field(default_factory=list)  # (time done, chunk)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rows_done: int = 0

    def cursor_class(self, base: type[Any], app: str) -> type[Any]:
        trace = self

        class TimedCursor(base):  # type: ignore[misc]
            def execute(self, query: Any, vars: Any = None) -> Any:
                text = query if isinstance(query, str) else query.as_string(self)
                started = time.monotonic()
                try:
                    return super().execute(query, vars)
                finally:
                    with trace._lock:
                        trace.statements.append(
                            Statement(app, " ".join(text.split()), started, time.monotonic() - started)
                        )

        return TimedCursor

    def connector(self, dsn: str, *, application_name: str = "zdm", **kwargs: Any) -> Connection:
        """Drop-in for `lambdas.core.db.connect` whose cursors time every execute()."""
        replication = kwargs.get("connection_factory") is psycopg2.extras.LogicalReplicationConnection
        base = psycopg2.extras.ReplicationCursor if replication else psycopg2.extensions.cursor
        kwargs["cursor_factory"] = self.cursor_class(base, application_name)
        return connect(dsn, application_name=application_name, **kwargs)

    def on_chunk(self, chunk: ChunkCopied) -> None:
        with self._lock:
            self.chunks.append((time.monotonic(), chunk))
            self._rows_done += chunk.rows
            done = self._rows_done
        pct = 100.0 * done / self.total_rows if self.total_rows else 100.0
        log(
            f"  copied {chunk.table} chunk {chunk.number}: {chunk.rows:,} rows in {chunk.seconds:.1f}s"
            f" ({chunk.rows / max(chunk.seconds, 1e-9):,.0f} rows/s); {done:,}/{self.total_rows:,} rows ({pct:.0f}%)"
        )


@dataclass
class EngineRun:
    schema_seconds: float
    copy_seconds: float
    rows_copied: int
    started: float
    trace: EngineTrace
    error: str | None = None  # why start() failed; copy_seconds is then the time until it failed

    @property
    def total_seconds(self) -> float:
        return self.schema_seconds + self.copy_seconds


def run_engine(
    source_dsn: str, target_dsn: str, tables: list[TableName], workers: int, chunk_rows: int, total_rows: int
) -> EngineRun:
    log("ours: creating the schema on target A")
    with timed() as schema_time:
        conn = connect(target_dsn, application_name="zdm-bench")
        try:
            sample.create_schema(conn)
        finally:
            conn.close()
    log(f"ours: schema created in {schema_time.seconds:.2f}s")

    trace = EngineTrace(total_rows)
    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_bench"),
        tuple(tables),
        LogicalSettings(copy_workers=workers, copy_chunk_rows=chunk_rows),
    )
    engine = LogicalEngine(source_dsn, target_dsn, plan, on_copy_progress=trace.on_chunk, connector=trace.connector)
    log(f"ours: LogicalEngine.start() with {workers} copy worker(s), {chunk_rows:,} rows per chunk")
    started = time.monotonic()
    rows_copied, error = 0, None
    with ticker(lambda: f"target A holds {database_size(target_dsn)}"), timed() as copy_time:
        try:
            rows_copied = engine.start().rows_copied
        except Exception as exc:  # reported (and made the exit status) by main; pgcopydb still runs
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if error:
        log(f"ours: start() FAILED after {copy_time.seconds:.2f}s: {error}")
    else:
        log(f"ours: start() returned after {copy_time.seconds:.2f}s ({rows_copied:,} rows copied)")
    # Teardown stops the walsender and apply worker, so they take no CPU while pgcopydb runs.
    try:
        removed = engine.teardown().removed
        log(f"ours: teardown removed {', '.join(removed) or 'nothing'}")
    except Exception as exc:
        log(f"ours: teardown failed ({type(exc).__name__}: {exc}); the servers are thrown away anyway")
    return EngineRun(schema_time.seconds, copy_time.seconds, rows_copied, started, trace, error)


def engine_breakdown(run: EngineRun) -> list[tuple[str, float | None]]:
    """Where start() spent its time: phases from the timed control statements, the copy in between.

    The copy window runs from the end of the statement that records the chunk plan on the
    target to the end of the last ANALYZE: each table's indexes are rebuilt and the table
    analyzed by the copy worker that finished it (zdm-copy sessions), overlapping the copy.
    """
    trace, t0, total = run.trace, run.started, run.copy_seconds
    control = [s for s in trace.statements if s.app in ("zdm-control", "zdm-slot")]

    def is_slot(t: str) -> bool:
        return t.startswith("CREATE_REPLICATION_SLOT")

    def is_plan(t: str) -> bool:
        return t.startswith("SELECT min(") or "TABLESAMPLE" in t

    def is_analyze(t: str) -> bool:
        return t.startswith("ANALYZE")

    def is_sub(t: str) -> bool:
        return t.startswith("CREATE SUBSCRIPTION")

    recorded = next((s for s in control if s.text.startswith("INSERT INTO") and "copy_chunks" in s.text), None)
    analyzes = [s for s in trace.statements if is_analyze(s.text)]
    if recorded is None or not analyzes:
        return [("start() total (no phases recognised)", total)]
    copy_start, copy_end = recorded.ended, max(s.ended for s in analyzes)
    before = [s for s in control if s.ended <= copy_start]
    imports = [s for s in trace.statements if s.app == "zdm-copy" and s.text.startswith("SET TRANSACTION SNAPSHOT")]
    last_chunk = max((done for done, _ in trace.chunks), default=None)
    analyze = sum((s.seconds for s in analyzes), 0.0)
    subscription = sum((s.seconds for s in control if is_sub(s.text)), 0.0)
    return [
        ("before the copy", copy_start - t0),
        ("  CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT", sum((s.seconds for s in before if is_slot(s.text)), 0.0)),
        ("  plan key ranges (min/max, samples)", sum((s.seconds for s in before if is_plan(s.text)), 0.0)),
        (
            "  other statements (catalog, publication, state)",
            sum((s.seconds for s in before if not (is_slot(s.text) or is_plan(s.text))), 0.0),
        ),
        ("parallel copy + index builds + ANALYZE (wall)", copy_end - copy_start),
        ("  open copy sessions + import snapshot", max(s.ended for s in imports) - copy_start if imports else None),
        ("  after the last chunk until the last ANALYZE ended", copy_end - last_chunk if last_chunk else None),
        ("  ANALYZE (cumulative, inside the window)", analyze),
        ("CREATE SUBSCRIPTION", subscription),
        ("rest (state update, round trips, closing)", max(0.0, total - (copy_end - t0) - subscription)),
        ("start() total", total),
    ]


def chunk_summary(trace: EngineTrace) -> list[list[Any]]:
    per_table: dict[str, list[ChunkCopied]] = {}
    for _, chunk in trace.chunks:
        per_table.setdefault(chunk.table, []).append(chunk)
    rows = []
    for table, chunks in sorted(per_table.items()):
        rows_copied = sum(c.rows for c in chunks)
        busy = sum(c.seconds for c in chunks)
        slowest = max(c.seconds for c in chunks)
        rows.append([table, len(chunks), rows_copied, busy, slowest, rows_copied / busy if busy else 0.0])
    return rows


# -- pgcopydb --------------------------------------------------------------------------------

_STEP_RE = re.compile(r"^\s*(?P<step>\S.*?)\s{2,}(?P<conn>source|target|both)\s+(?P<duration>\S+)\s+(?P<conc>.+?)\s*$")


@dataclass
class PgcopydbRun:
    seconds: float
    returncode: int
    steps: list[tuple[str, str, str]]  # (step, connection, duration) from its summary
    log_path: Path


def run_pgcopydb(source_uri: str, target_uri: str, workers: int, split_larger_than: str | None) -> PgcopydbRun:
    binary = shutil.which(PGCOPYDB)
    if binary is None:
        raise SystemExit("pgcopydb not found on PATH: install Debian's 'pgcopydb' package (apt-get install pgcopydb)")
    workdir = Path(tempfile.mkdtemp(prefix="zdm-bench-pgcopydb-"))  # ours, so writable; pgcopydb runs fine as root
    log_path = Path(tempfile.gettempdir()) / f"zdm-bench-pgcopydb-{int(time.time())}.log"
    argv = [
        binary, "clone",
        "--source", source_uri,
        "--target", target_uri,
        "--table-jobs", str(workers),
        "--index-jobs", str(workers),
        "--dir", str(workdir / "work"),
    ]  # fmt: skip
    if split_larger_than:
        argv += ["--split-tables-larger-than", split_larger_than]
    log(f"pgcopydb: {' '.join(argv)}")
    # Consistent mode (the default): one exported snapshot for schema dump and every COPY.
    run = run_tool(argv, prefix="pgcopydb", log_file=log_path)
    steps = []
    for line in run.output.splitlines():
        match = _STEP_RE.match(line)
        if match and match["step"] != "Step":
            steps.append((match["step"], match["conn"], match["duration"]))
    if run.returncode == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"pgcopydb: failed with exit code {run.returncode}; its work directory {workdir} is kept")
    log(f"pgcopydb: exit {run.returncode} after {run.seconds:.2f}s (output kept in {log_path})")
    return PgcopydbRun(run.seconds, run.returncode, steps, log_path)


# -- the benchmark ----------------------------------------------------------------------------


def build_source(dsn: str, rows: int) -> int:
    log(f"source: creating the sample schema and loading about {rows:,} rows")
    conn = connect(dsn, application_name="zdm-bench")
    try:
        sample.create_schema(conn)
        with ticker(lambda: f"source holds {database_size(dsn)}"), timed() as t:
            sizes = sample.load_data(conn, rows)
    finally:
        conn.close()
    log(
        f"source: loaded {sizes.total:,} rows in {t.seconds:.1f}s (customers {sizes.customers:,},"
        f" products {sizes.products:,}, orders {sizes.orders:,}, order_items {sizes.order_items:,},"
        f" events {sizes.events:,}); {database_size(dsn)}"
    )
    with timed() as t:
        settle(dsn)
    log(f"source: VACUUM ANALYZE + CHECKPOINT in {t.seconds:.1f}s")
    return sizes.total


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows in the sample shop (default 5,000,000)")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="copy jobs for both tools (default: CPUs)"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=LogicalSettings().copy_chunk_rows, help="our engine's rows per chunk"
    )
    parser.add_argument(
        "--pgcopydb-split",
        metavar="SIZE",
        default=None,
        help="pass --split-tables-larger-than SIZE to pgcopydb (same-table concurrency, e.g. '50MB'); off by default",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be between 1 and 64 (the engine's copy_workers limit)")
    if args.chunk_rows < 1000:
        parser.error("--chunk-rows must be at least 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tables = [TableName.parse(t) for t in sample.SAMPLE_TABLES]
    with bench_servers(["bench-source", "bench-engine", "bench-pgcopydb"], DBNAME) as (source, target_a, target_b):
        source_dsn, engine_dsn, pgcopydb_dsn = source.dsn(DBNAME), target_a.dsn(DBNAME), target_b.dsn(DBNAME)
        rows = build_source(source_dsn, args.rows)
        busy = [check_quiet("our engine's copy")]
        engine = run_engine(source_dsn, engine_dsn, tables, args.workers, args.chunk_rows, rows)
        log("checking target A row for row against the source (count + ordered md5 per table)")
        with timed() as t:
            prints = fingerprints_of({"source": source_dsn, "engine": engine_dsn}, tables)
        log(f"check done in {t.seconds:.1f}s")
        # Target A's autovacuum (millions of fresh rows) would otherwise compete with pgcopydb for CPU.
        target_a.stop()
        log("stopped target A")
        busy.append(check_quiet("pgcopydb"))
        pgc = run_pgcopydb(server_uri(source, DBNAME), server_uri(target_b, DBNAME), args.workers, args.pgcopydb_split)
        log("checking target B row for row against the source")
        with timed() as t:
            prints.update(fingerprints_of({"pgcopydb": pgcopydb_dsn}, tables))
        log(f"check done in {t.seconds:.1f}s")
    engine_problems = mismatches(prints["source"], prints["engine"])
    if engine.error:
        engine_problems.insert(0, f"LogicalEngine.start() failed: {engine.error}")
    pgcopydb_problems = mismatches(prints["source"], prints["pgcopydb"])
    if pgc.returncode != 0:
        pgcopydb_problems.insert(0, f"pgcopydb exited with code {pgc.returncode}; see {pgc.log_path}")

    engine_ok, pgcopydb_ok = not engine_problems, not pgcopydb_problems
    # A time is only a result when the run finished; a failed run's time is left out (null).
    copy_s = None if engine.error else engine.copy_seconds
    total_s = None if engine.error else engine.total_seconds
    pgcopydb_s = pgc.seconds if pgc.returncode == 0 else None
    ratio = total_s / pgcopydb_s if total_s is not None and pgcopydb_s else None
    result = {
        "rows": rows,
        "workers": args.workers,
        "engine_copy_seconds": _round(copy_s, 3),
        "engine_schema_seconds": _round(engine.schema_seconds, 3),
        "engine_total_seconds": _round(total_s, 3),
        "pgcopydb_seconds": _round(pgcopydb_s, 3),
        "ratio": _round(ratio, 4),
        "engine_rows_match": engine_ok,
        "pgcopydb_rows_match": pgcopydb_ok,
        "goal_ratio": GOAL_RATIO,
        "goal_met": engine_ok and ratio is not None and ratio <= GOAL_RATIO,
        # how busy the CPUs were (others' work) before ours and before pgcopydb; over 0.10: noisy timings
        "cpu_busy_before": [_round(b, 3) for b in busy],
    }

    out: TextIO = sys.stderr if args.json else sys.stdout
    report(out, rows, engine, pgc, ratio, engine_ok, pgcopydb_ok)
    if args.json:
        emit_json(result)
    for label, problems in (("our engine", engine_problems), ("pgcopydb", pgcopydb_problems)):
        for problem in problems:
            print(f"MISMATCH ({label}): {problem}", file=sys.stderr)
    if engine_problems or pgcopydb_problems:
        who = " and ".join(n for n, p in (("our engine", engine_problems), ("pgcopydb", pgcopydb_problems)) if p)
        print(f"error: the copy made by {who} does not match the source (see MISMATCH lines above)", file=sys.stderr)
        return 1
    return 0


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _rate(rows: int, seconds: float | None) -> float | None:
    return rows / seconds if seconds else None


def report(
    out: TextIO, rows: int, engine: EngineRun, pgc: PgcopydbRun, ratio: float | None, engine_ok: bool, pgcopydb_ok: bool
) -> None:
    print(file=out)
    print("Where our engine's start() spent its time:", file=out)
    print_table(["phase", "seconds"], [[name, seconds] for name, seconds in engine_breakdown(engine)], out)
    print(file=out)
    print_table(
        ["table", "chunks", "rows", "chunk-seconds", "slowest chunk", "rows/s per stream"],
        chunk_summary(engine.trace),
        out,
    )
    if pgc.steps:
        print(file=out)
        print("pgcopydb's own summary:", file=out)
        print_table(["step", "connection", "duration"], [list(s) for s in pgc.steps], out)
    copy_s = None if engine.error else engine.copy_seconds
    total_s = None if engine.error else engine.total_seconds
    pgcopydb_s = pgc.seconds if pgc.returncode == 0 else None
    print(file=out)
    print_table(
        ["tool", "seconds", "rows/s", "matches"],
        [
            ["ours: schema", engine.schema_seconds, None, None],
            ["ours: copy (LogicalEngine.start)", copy_s, _rate(rows, copy_s), engine_ok],
            ["ours: total (schema + copy)", total_s, _rate(rows, total_s), engine_ok],
            ["pgcopydb clone", pgcopydb_s, _rate(rows, pgcopydb_s), pgcopydb_ok],
        ],
        out,
    )
    if ratio is None:
        print("\nratio ours/pgcopydb: n/a (a tool failed; see the errors below)", file=out)
    else:
        met = "met" if engine_ok and ratio <= GOAL_RATIO else "NOT met"
        print(f"\nratio ours/pgcopydb: {ratio:.3f} (goal <= {GOAL_RATIO}: {met})", file=out)
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
