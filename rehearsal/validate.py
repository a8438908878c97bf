"""`python -m rehearsal.validate`: prove that every row of the source is on the target, or name the rows that differ.

The same validator the migration's state machine runs (plan, chunks compared on both sides at
once, summary), between any two PostgreSQL databases you name:

    python -m rehearsal.validate --source "host=... dbname=app user=..." --target "host=... dbname=app user=..."
    python -m rehearsal.validate --source ... --target ... --tables 'public.*' --exclude 'public.audit_*' --json
    python -m rehearsal.validate --migration migrations/local.yaml

DSNs may also come from ZDM_SOURCE_DSN / ZDM_TARGET_DSN (keeps a password off the process list;
better still, use ~/.pgpass). Progress goes to stderr, the result to stdout (a table, or with
`--json` one JSON object). Exit status: 0 equal, 1 differences or schema problems, 2 error.
While logical replication runs into the target, give its subscription (`--subscription`, found
automatically with `--migration`): differences are then re-checked once the target has applied
the source's WAL, and only those that persist are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import psycopg2

from lambdas.core.bulk_reads import tune_for_bulk_reads
from lambdas.core.catalog import list_tables
from lambdas.core.config import MigrationFileError, Validation, load_migration
from lambdas.core.db import DatabaseUnreachable
from lambdas.core.endpoints import EndpointError, SecretReader, resolve_dsn
from lambdas.core.tables import TableName, select_tables, unmatched_patterns
from lambdas.core.validation import (
    ChunkResult,
    ChunkStep,
    Replication,
    SessionPair,
    TableSummary,
    ValidationPlan,
    ValidationSummary,
    plan_validation,
    replication_of,
    run_chunks,
    summarize,
)

EXIT_EQUAL, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


class UsageError(ValueError):
    pass


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rehearsal.validate",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    where = parser.add_argument_group("databases")
    where.add_argument("--source", help="source DSN (or ZDM_SOURCE_DSN)")
    where.add_argument("--target", help="target DSN (or ZDM_TARGET_DSN)")
    where.add_argument("--migration", help="a migration file: its endpoints, tables and validation settings")
    what = parser.add_argument_group("tables")
    what.add_argument(
        "--tables", action="append", metavar="PATTERN", help="'schema.table' pattern, repeatable (default public.*)"
    )
    what.add_argument("--exclude", action="append", metavar="PATTERN", default=[], help="pattern to leave out")
    how = parser.add_argument_group("comparison")
    how.add_argument(
        "--workers", type=int, help="chunks compared at once (default: the file's max_parallel_chunks, or 4)"
    )
    how.add_argument("--chunk-rows", type=int, help="rows per chunk (default 100,000)")
    how.add_argument("--slice-rows", type=int, help="rows per slice compared inside a chunk (default 10,000)")
    how.add_argument("--first-keys", type=int, help="differing keys listed per kind and table (default 20)")
    how.add_argument("--row-hash", choices=["auto", "md5"], help="auto (fast when both servers agree) or md5")
    how.add_argument("--subscription", help="re-check differences while this subscription replicates into the target")
    how.add_argument("--slot", help="its slot on the source (default: the subscription's name)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


# -- what to compare ------------------------------------------------------------------------


def _secrets() -> SecretReader:
    import boto3  # only when the migration file names Secrets Manager secrets

    client: SecretReader = boto3.client("secretsmanager")
    return client


def resolve(args: argparse.Namespace) -> tuple[str, str, list[str], list[str], Validation, str | None]:
    """(source DSN, target DSN, include, exclude, settings, subscription to re-check against)."""
    settings = Validation(max_parallel_chunks=4)
    include: list[str] = ["public.*"]
    exclude: list[str] = list(args.exclude)
    subscription: str | None = args.subscription
    source, target = args.source or os.environ.get("ZDM_SOURCE_DSN"), args.target or os.environ.get("ZDM_TARGET_DSN")
    if args.migration:
        migration = load_migration(args.migration)
        needs_secrets = migration.source.secret_arn is not None or migration.target.secret_arn is not None
        client = _secrets() if needs_secrets else None
        source = source or resolve_dsn(migration.source, client)
        target = target or resolve_dsn(migration.target, client)
        settings = migration.validation
        include, exclude = list(migration.tables.include), [*migration.tables.exclude, *exclude]
        if subscription is None and migration.engine.type == "logical":
            subscription = migration.slot_name
    if not source or not target:
        raise UsageError("give --source and --target DSNs (or ZDM_SOURCE_DSN / ZDM_TARGET_DSN), or --migration FILE")
    overrides: dict[str, Any] = {
        "max_parallel_chunks": args.workers,
        "chunk_rows": args.chunk_rows,
        "slice_rows": args.slice_rows,
        "report_first_keys": args.first_keys,
        "row_hash": args.row_hash,
    }
    settings = Validation.model_validate(
        {**settings.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    )
    return source, target, list(args.tables or include), exclude, settings, subscription


# -- progress ----------------------------------------------------------------------------------


class Progress:
    """One line on stderr per second or so (redrawn in place on a terminal): chunks done, rows, differences,
    and what the longest-running chunk is doing now (a table in no key order is one chunk that runs for
    minutes on a large table). Use it as a context manager: it redraws on its own while chunks run."""

    def __init__(self, stream: TextIO, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.clock = clock
        self.interval = 0.2 if self.tty else 2.0
        self.started = clock()
        self.last = 0.0
        self.lock = threading.Lock()
        self.rows = 0
        self.differences = 0
        self.done = 0
        self.planned = 0
        self.running: dict[tuple[str, int], tuple[float, ChunkStep]] = {}  # chunk -> (since, its last step)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="zdm-validate-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.clock() - self.started:6.1f}s] {text}", file=self.stream, flush=True)

    def plan(self, plan: ValidationPlan) -> None:
        self.planned = len(plan.chunks)
        hashes = sorted({str(t.row_hash) for t in plan.tables})
        live = any(c.replication is not None for c in plan.chunks)
        self.say(
            f"planned {len(plan.tables)} table(s), {self.planned} chunk(s); row hash {', '.join(hashes) or '-'}"
            + ("; re-checking differences against live replication" if live else "")
        )

    def step(self, step: ChunkStep) -> None:
        with self.lock:
            since = self.running.get((step.table, step.chunk), (self.clock(), step))[0]
            self.running[(step.table, step.chunk)] = (since, step)
            self._draw()

    def chunk(self, result: ChunkResult, done: int, planned: int) -> None:
        with self.lock:
            self.running.pop((result.table, result.chunk), None)
            self.rows += result.source_rows
            self.differences += result.differences + result.unsettled.count
            self.done, self.planned = done, planned
            self._draw(final=done == planned)

    def line(self) -> str:
        """The progress line as it stands (the caller holds the lock)."""
        elapsed = self.clock() - self.started
        line = (
            f"[{elapsed:6.1f}s] {self.done}/{self.planned} chunks, {self.rows:,} rows, {self.differences:,} "
            f"difference(s), {self.rows / max(elapsed, 1e-9):,.0f} rows/s"
        )
        if self.running:
            since, step = min(self.running.values(), key=lambda item: item[0])
            line += f"; now {step.table} chunk {step.chunk + 1}/{step.chunks} ({self.clock() - since:.0f}s): {step.describe()}"
        return line

    def _draw(self, *, final: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (now - self.last < self.interval and not final):
            return
        self.last = now
        if self.tty:
            print("\r" + self.line() + "\033[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def _tick(self) -> None:
        # Steps may go quiet for long (one scan counting a table's rows per key bucket): redraw anyway.
        while not self._stop.wait(self.interval):
            with self.lock:
                if self.running:
                    self._draw()


# -- output ------------------------------------------------------------------------------------


def _key(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else "(" + ", ".join(values) + ")"


def _status(table: TableSummary) -> str:
    if not table.compared:
        return "NOT COMPARED"
    return "equal" if table.ok else "DIFFERENT"


def render(summary: ValidationSummary, out: TextIO) -> None:
    headers = ["table", "rows (source)", "rows (target)", "chunks", "missing", "extra", "changed", "unsettled",
               "transient", "seconds", "rows/s", "status"]  # fmt: skip
    rows = [
        [
            t.table + (" (no key: multiset)" if t.multiset and t.compared else ""),
            f"{t.source_rows:,}",
            f"{t.target_rows:,}",
            str(t.chunks),
            f"{t.missing.count:,}",
            f"{t.extra.count:,}",
            f"{t.changed.count:,}",
            f"{t.unsettled.count:,}",
            f"{t.transient:,}",
            f"{t.seconds:.2f}",
            f"{t.rows_per_second:,.0f}",
            _status(t),
        ]
        for t in summary.per_table
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        cells = [
            c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
    for t in summary.per_table:
        for problem in t.problems:
            print(f"{t.table}: {problem}", file=out)
        for note in t.notes:
            print(f"{t.table}: note: {note}", file=out)
        for kind, label in (
            ("missing", "missing on the target"),
            ("extra", "extra on the target"),
            ("changed", "changed"),
            ("unsettled", "kept changing at every re-check (not proven equal)"),
        ):
            listed = getattr(t, kind)
            if not listed.count:
                continue
            print(f"{t.table}: {listed.count:,} {label}, first {len(listed.first)}:", file=out)
            for entry in listed.first:
                detail = f"  columns: {', '.join(entry.columns)}" if entry.columns else ""
                copies = f"  ({entry.copies} copies)" if entry.copies > 1 else ""
                print(f"  {_key(entry.key)}{detail}{copies}", file=out)
    verdict = "EQUAL" if summary.ok else "DIFFERENT"
    print(
        f"{verdict}: {summary.rows_compared:,} rows compared in {summary.seconds:.1f}s "
        f"({summary.rows_per_second:,.0f} rows/s); {summary.differences:,} difference(s) "
        f"(missing {summary.missing:,}, extra {summary.extra:,}, changed {summary.changed:,}), "
        f"{summary.unsettled:,} unsettled, {summary.transient:,} transient, {summary.problems} schema problem(s)",
        file=out,
    )


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, progress: Progress) -> ValidationSummary:
    source_dsn, target_dsn, include, exclude, settings, subscription = resolve(args)
    with SessionPair.open(source_dsn, target_dsn) as pair:
        candidates = list_tables(pair.source)
        missing_patterns = unmatched_patterns(candidates, include)
        if missing_patterns:
            progress.say(f"warning: no source table matches {', '.join(missing_patterns)}")
        tables: list[TableName] = select_tables(candidates, include, exclude)
        replication: Replication | None = None
        if subscription:
            replication = replication_of(pair.target, subscription, slot=args.slot or subscription, settings=settings)
            if replication is None and args.subscription:
                raise UsageError(f"subscription {subscription!r} does not exist or is disabled on the target")
        plan = plan_validation(pair, tables, settings, replication=replication)
    progress.plan(plan)
    with progress:
        results = run_chunks(
            source_dsn,
            target_dsn,
            plan.chunks,
            workers=settings.max_parallel_chunks,
            on_result=progress.chunk,
            on_step=progress.step,
        )
    return summarize(plan, results, finished_at=time.time())


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = parse_args(argv)
    tune_for_bulk_reads()
    progress = Progress(err, enabled=not args.quiet)
    try:
        summary = run(args, progress)
    except (UsageError, MigrationFileError, EndpointError, DatabaseUnreachable, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    except psycopg2.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: the database refused a validation query: {first}", file=err)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(summary.model_dump(mode="json")), file=out, flush=True)
    else:
        render(summary, out)
    return EXIT_EQUAL if summary.ok else EXIT_DIFFERENT


if __name__ == "__main__":
    sys.exit(main())
