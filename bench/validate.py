"""Validation: our validator against reladiff (hashdiff) and the floor, on the same pair in the same run.

    python -m bench.validate [--rows N] [--diffs K | --diff-rate R] [--workers W] [--json]

Starts two servers and builds the same table of N rows (a bigint key in load order, or with
`--key` a uuid, a text (md5 hex) or a scattered bigint one, all in no physical order; integer, text, numeric,
double precision, timestamptz, nullable text) on both, then scatters differences over the
target: about 60% changed rows (one column each, in turn), 20% deleted, 20% extra (keys in the
gaps between source keys). Default: a few dozen; `--diff-rate 0.01` changes 1% of the rows.
Both databases are settled (VACUUM ANALYZE, CHECKPOINT) and then three things are timed:

- the floor: one aggregate scan of the whole table (count and sum of the same row hash the
  validator uses), on both servers at the same time, with PostgreSQL's parallel query; no
  validator that reads every row of both sides can take less;
- ours: `lambdas.core.validation.validate` (plan, chunks on W session pairs, summary);
- reladiff: its command line, hashdiff, with W threads per database.

Each run also counts CPU seconds: on the two servers (all their processes, from /proc) and in
the client. Here all of them share the machine's CPUs, so wall time follows the sum; on AWS each
database has its own CPUs and the validator runs in Lambda, so the servers' seconds against the
floor's are the figure that carries over.

Each tool's differing keys are checked against the injected ones. Goals: at least 3x faster than
reladiff, at most 1.5x the floor, the same keys found. Exits non-zero if our validator misses or
invents a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from psycopg2 import sql

from bench.common import (
    CpuUse,
    bench_servers,
    check_quiet,
    cpu_used,
    default_workers,
    emit_json,
    log,
    print_table,
    run_tool,
    server_uri,
    settle,
    ticker,
    timed,
)
from lambdas.core.bulk_reads import tune_for_bulk_reads
from lambdas.core.config import Validation
from lambdas.core.db import connect, execute, fetch_one
from lambdas.core.tables import TableName
from lambdas.core.validation import ChunkResult, ChunkStep, SessionPair, ValidationPlan, validate
from lambdas.core.validation.queries import row_hash
from rehearsal.servers import PostgresServer

DBNAME = "bench"
TABLE = TableName("public", "bench_rows")
COLUMNS = ["customer_id", "status", "amount", "score", "created_at", "note"]
GOAL_SPEEDUP = 3.0  # at least 3x faster than reladiff
GOAL_FLOOR_RATIO = 1.5  # at most 1.5x the floor
DEFAULT_DIFFS = 36


@dataclass(frozen=True)
class BenchKey:
    """The table's key type, and how row number n's key is made from it (in SQL and as text)."""

    type: str
    expression: str  # SQL of the key of the bigint `{n}`
    key_text: Callable[[int], str]  # the same key as the server prints it

    def sql(self, n: str) -> str:
        return self.expression.format(n=n)

    def text(self, n: int) -> str:
        return self.key_text(n)


def md5_hex(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()


def md5_uuid(n: int) -> str:
    return str(uuid.UUID(md5_hex(n)))


# n -> n * P mod M (M = 2**61 - 1, a prime; P about 0.63 M): distinct keys for every n below M, in no order.
SCATTER_P, SCATTER_M = 1_442_695_040_888_963_407, 2**61 - 1

KEYS = {
    "bigint": BenchKey("bigint", "{n}", str),
    "uuid": BenchKey("uuid", "md5(({n})::text)::uuid", md5_uuid),
    "text": BenchKey("text", "md5(({n})::text)", md5_hex),
    "scattered-bigint": BenchKey(
        "bigint", f"mod(({{n}})::numeric * {SCATTER_P}, {SCATTER_M})::bigint", lambda n: str(n * SCATTER_P % SCATTER_M)
    ),
}

CREATE = """
CREATE TABLE bench_rows (
    id          {key_type} PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2) NOT NULL,
    score       double precision,
    created_at  timestamptz NOT NULL,
    note        text
)"""
# Keys are even (2, 4, ...), so extra rows can sit in the gaps, scattered through the key space.
LOAD = """
INSERT INTO bench_rows
SELECT {key}, 1 + g %% 100000, (ARRAY['new','paid','shipped','cancelled'])[1 + g %% 4],
       round((g %% 100000) / 13.0, 2), g / 7.0,
       timestamptz '2021-06-01 12:00:00+00' + g * interval '1 second',
       CASE WHEN g %% 5 = 0 THEN NULL ELSE 'note ' || g || ' – ünïcødé' END
FROM generate_series(%(low)s, %(high)s) g"""

# One column changes per changed row, in turn; each change is visible to every tool.
CHANGES = {
    "status": "status = status || '!'",
    "amount": "amount = amount + 1",
    "created_at": "created_at = created_at + interval '1 second'",
    "note": "note = coalesce(note || '~', 'was null')",
    "customer_id": "customer_id = customer_id + 1",
}


@dataclass
class Injected:
    key: BenchKey = KEYS["bigint"]
    missing: list[int] = field(default_factory=list)  # row numbers n (the key made of n by `key`)
    extra: list[int] = field(default_factory=list)
    changed: dict[str, list[int]] = field(default_factory=dict)

    @property
    def keys(self) -> set[str]:
        numbers = [*self.missing, *self.extra, *(k for ks in self.changed.values() for k in ks)]
        return {self.key.text(n) for n in numbers}


def load(dsn: str, rows: int, key: BenchKey = KEYS["bigint"], batch: int = 2_000_000) -> None:
    conn = connect(dsn, application_name="zdm-bench-load")
    try:
        execute(conn, CREATE.format(key_type=key.type))
        for low in range(1, rows + 1, batch):
            execute(conn, LOAD.format(key=key.sql("2 * g")), {"low": low, "high": min(rows, low + batch - 1)})
    finally:
        conn.close()


def inject(dsn: str, rows: int, count: int, key: BenchKey = KEYS["bigint"], seed: int = 4) -> Injected:
    """Scatter `count` differences over the target (deterministic for a seed)."""
    rng = random.Random(seed)  # reproducible choice of keys
    n_extra = count // 5
    n_missing = count // 5
    n_changed = count - n_extra - n_missing
    picked = rng.sample(range(1, rows + 1), n_missing + n_changed)
    injected = Injected(key=key, missing=[2 * g for g in picked[:n_missing]])
    keys_of = f"ARRAY(SELECT {key.sql('n')} FROM unnest(%s::bigint[]) n)"  # the keys of row numbers
    names = list(CHANGES)
    for i, g in enumerate(picked[n_missing:]):
        injected.changed.setdefault(names[i % len(names)], []).append(2 * g)
    injected.extra = [2 * g + 1 for g in rng.sample(range(1, rows + 1), n_extra)]
    conn = connect(dsn, application_name="zdm-bench-inject")
    try:
        execute(conn, f"DELETE FROM bench_rows WHERE id = ANY({keys_of})", (injected.missing,))
        for column, keys in injected.changed.items():
            execute(conn, "UPDATE bench_rows SET " + CHANGES[column] + f" WHERE id = ANY({keys_of})", (keys,))
        execute(
            conn,
            f"INSERT INTO bench_rows SELECT {key.sql('n')}, 7, 'extra', 1.00, 0.5,"
            " timestamptz '2030-01-01 00:00:00+00', 'extra' FROM unnest(%s::bigint[]) n",
            (injected.extra,),
        )
    finally:
        conn.close()
    return injected


# -- the floor ---------------------------------------------------------------------------------


def floor_scan(source_dsn: str, target_dsn: str, plan: ValidationPlan, workers: int) -> float:
    """One aggregate scan of the table on both servers at once, using the plan's row hash.

    Parallel query gives each side `workers` processes (the leader and `workers - 1` parallel
    workers), as many as the validator's `workers` session pairs put on each side.
    """
    spec = plan.tables[0]
    query = sql.SQL("SELECT count(*), sum({h}) FROM {t} AS t").format(h=row_hash(spec), t=TABLE.ident)

    def scan(dsn: str) -> float:
        conn = connect(dsn, application_name="zdm-bench-floor")
        try:
            # JIT off, as in the validator's sessions: compiling would only add to the floor.
            # min_parallel_table_scan_size 0: otherwise the planner sizes the gather by the table
            # (1 worker below 24 MB, 5 at 1 GB) and the floor gets fewer processes than `workers`.
            execute(
                conn,
                "SET max_parallel_workers_per_gather = %s; SET min_parallel_table_scan_size = 0; SET jit = off",
                (max(0, workers - 1),),
            )
            with timed() as t:
                fetch_one(conn, query)
            return t.seconds
        finally:
            conn.close()

    with timed() as both, ThreadPoolExecutor(2) as pool:
        list(pool.map(scan, [source_dsn, target_dsn]))
    return both.seconds


def plan_only(source_dsn: str, target_dsn: str, settings: Validation) -> ValidationPlan:
    from lambdas.core.validation import plan_validation

    with SessionPair.open(source_dsn, target_dsn) as pair:
        return plan_validation(pair, [TABLE], settings)


# -- the tools -----------------------------------------------------------------------------------


@dataclass
class ToolResult:
    name: str
    seconds: float
    keys: set[str]
    ok: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: CpuUse = field(default_factory=CpuUse)


def run_ours(source_dsn: str, target_dsn: str, settings: Validation, workers: int) -> ToolResult:
    tune_for_bulk_reads()  # as the command line (`python -m rehearsal.validate`) and the chunk Lambda do
    results: list[ChunkResult] = []
    progress = {"done": 0, "planned": 0, "rows": 0}
    steps: list[ChunkStep] = []  # the latest step a chunk reported

    def on_plan(plan: ValidationPlan) -> None:
        progress["planned"] = len(plan.chunks)
        bits = [c.bucket_bits for c in plan.chunks if c.bucket_bits is not None]
        shape = f"in {2 ** max(bits):,} key buckets" if bits else f"of ~{settings.chunk_rows:,} rows"
        log(f"  zdm: {len(plan.chunks)} chunks {shape}, row hash {plan.tables[0].row_hash}")

    def on_result(result: ChunkResult, done: int, planned: int) -> None:
        results.append(result)
        progress["done"], progress["rows"] = done, progress["rows"] + result.source_rows

    def on_step(step: ChunkStep) -> None:
        steps[:] = [step]

    def describe() -> str:
        text = f"zdm: {progress['done']}/{progress['planned']} chunks, {progress['rows']:,} rows"
        for step in steps[-1:]:
            text += f"; chunk {step.chunk + 1}: {step.describe()}"
        return text

    with ticker(describe), timed() as t:
        summary = validate(
            source_dsn,
            target_dsn,
            [TABLE],
            settings,
            workers=workers,
            on_plan=on_plan,
            on_result=on_result,
            on_step=on_step,
        )
    keys = {k.key[0] for r in results for d in (r.missing, r.extra, r.changed) for k in d.first}
    table = summary.per_table[0]
    return ToolResult(
        "zdm validate",
        t.seconds,
        keys,
        note=f"{table.chunks} chunks, {sum(r.slices for r in results):,} key ranges, "
        f"{sum(r.slices_mismatched for r in results):,} mismatched, {sum(r.rows_fetched for r in results):,} "
        "(key, hash) pairs fetched",
        extra={
            "rows_compared": summary.rows_compared,
            "missing": summary.missing,
            "extra": summary.extra,
            "changed": summary.changed,
            "unsettled": summary.unsettled,
            "slices": sum(r.slices for r in results),
            "slices_mismatched": sum(r.slices_mismatched for r in results),
            "rows_fetched": sum(r.rows_fetched for r in results),
        },
    )


_RELADIFF_LINE = re.compile(r"^([+-]) (\S+?),")


def run_reladiff(source_uri: str, target_uri: str, workers: int) -> ToolResult:
    argv = [
        os.path.join(os.path.dirname(sys.executable), "reladiff"),
        source_uri,
        TABLE.name,
        target_uri,
        TABLE.name,
        "-k",
        "id",
        *(arg for c in COLUMNS for arg in ("-c", c)),
        "-a",
        "hashdiff",
        "-j",
        str(workers),
        # Its sort of the differences fails on NULLs ('<' between None and str); unsorted output is complete.
        "--skip-sort-results",
    ]
    # rich wraps its output at the terminal width; a wide one keeps one difference per line.
    run = run_tool(argv, prefix="reladiff", env={"COLUMNS": "100000", "NO_COLOR": "1"})
    keys = {m.group(2) for line in run.output.splitlines() if (m := _RELADIFF_LINE.match(line))}
    failed = run.returncode != 0 or " ERROR " in run.output
    return ToolResult(
        f"reladiff {metadata.version('reladiff')} hashdiff",
        run.seconds,
        keys,
        ok=not failed,
        note="failed: see its output above" if failed else f"-j {workers}",
    )


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the table (default 10,000,000)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--diffs", type=int, default=None, help=f"differences to inject (default {DEFAULT_DIFFS})")
    group.add_argument("--diff-rate", type=float, default=None, help="differences as a fraction of rows, e.g. 0.01")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="chunk workers (session pairs) and reladiff threads"
    )
    parser.add_argument(
        "--key",
        choices=sorted(KEYS),
        default="bigint",
        help="the key (default bigint, in load order; uuid: md5 of the number, text: its md5 in hex,"
        " scattered-bigint: the number times a prime modulo 2**61-1; all in no physical order)",
    )
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (default 100,000)")
    parser.add_argument("--slice-rows", type=int, default=10_000, help="rows per slice (default 10,000)")
    parser.add_argument(
        "--shared-buffers",
        default=None,
        help="the servers' shared_buffers, e.g. 2GB (default: the test servers' 256MB; a production server "
        "often holds a 10M-row table in its cache, which index range scans profit from more than the floor's scan)",
    )
    parser.add_argument(
        "--bucket-scan-max-rows",
        type=int,
        default=Validation().bucket_scan_max_rows,
        help="rows one scan process hashes in a task, for a table keyed in no order (default 100,000,000): lower"
        " it to see such a table in more buckets, and split into groups of buckets (one task each) past what the"
        " bench's 2 processes a side hash",
    )
    parser.add_argument("--skip-reladiff", action="store_true", help="time only ours and the floor")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    count = round(args.rows * args.diff_rate) if args.diff_rate is not None else (args.diffs or DEFAULT_DIFFS)
    count = max(0, min(count, args.rows))
    settings = Validation(
        chunk_rows=args.chunk_rows,
        slice_rows=args.slice_rows,
        max_parallel_chunks=args.workers,
        report_first_keys=count + 1,
        bucket_scan_max_rows=args.bucket_scan_max_rows,
    )
    server_settings = {"shared_buffers": args.shared_buffers} if args.shared_buffers else None
    with bench_servers(["bench-val-source", "bench-val-target"], dbname=DBNAME, settings=server_settings) as servers:
        source_server, target_server = servers
        src, tgt = source_server.dsn(DBNAME), target_server.dsn(DBNAME)
        log(f"loading {args.rows:,} rows into both servers ...")
        with timed() as t, ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda dsn: load(dsn, args.rows, KEYS[args.key]), [src, tgt]))
        log(f"loaded in {t.seconds:.1f}s; injecting {count:,} differences into the target")
        injected = inject(tgt, args.rows, count, KEYS[args.key])
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(settle, [src, tgt]))
        busy = check_quiet("the timed runs")

        plan = plan_only(src, tgt, settings)
        log(f"floor: one aggregate scan of each side ({args.workers} process(es) each), both at once")
        floors: list[ToolResult] = []
        for _ in range(2):
            with cpu_used(servers) as cpu:
                seconds = floor_scan(src, tgt, plan, args.workers)
            floors.append(ToolResult("floor", seconds, set(), cpu=cpu))
        floor = min(floors, key=lambda f: f.seconds)
        log(f"floor: {floor.seconds:.2f}s (runs: {', '.join(f'{f.seconds:.2f}s' for f in floors)})")

        log("zdm validate ...")
        with cpu_used(servers) as cpu:
            ours = run_ours(src, tgt, settings, args.workers)
        ours.cpu = cpu
        log(f"zdm validate: {ours.seconds:.2f}s, {len(ours.keys):,} differing keys")
        theirs: ToolResult | None = None
        if not args.skip_reladiff:
            log("reladiff ...")
            with cpu_used(servers) as cpu:
                theirs = run_reladiff(_reladiff_uri(source_server), _reladiff_uri(target_server), args.workers)
            theirs.cpu = cpu
            log(f"reladiff: {theirs.seconds:.2f}s, {len(theirs.keys):,} differing keys")
    return report(args, count, injected, floor, ours, theirs, busy)


def report(
    args: argparse.Namespace,
    count: int,
    injected: Injected,
    floor_run: ToolResult,
    ours: ToolResult,
    theirs: ToolResult | None,
    busy: float | None = None,
) -> int:
    truth = injected.keys
    floor = floor_run.seconds
    speedup = theirs.seconds / ours.seconds if theirs and ours.seconds > 0 else None
    floor_ratio = ours.seconds / floor if floor > 0 else None
    server_ratio = _ratio(ours.cpu.servers, floor_run.cpu.servers)
    same_keys = theirs.keys == ours.keys if theirs else None
    result: dict[str, Any] = {
        "rows": args.rows,
        "key": args.key,
        "diff_rate": args.diff_rate,
        "injected": len(truth),
        "workers": args.workers,
        "chunk_rows": args.chunk_rows,
        "slice_rows": args.slice_rows,
        "shared_buffers": args.shared_buffers or "256MB",
        "floor_seconds": round(floor, 3),
        "zdm_seconds": round(ours.seconds, 3),
        "reladiff_seconds": round(theirs.seconds, 3) if theirs else None,
        "speedup_vs_reladiff": round(speedup, 2) if speedup else None,
        "ratio_to_floor": round(floor_ratio, 2) if floor_ratio else None,
        # CPU seconds on the two database servers, and in the client: on this one machine they share
        # the CPUs; on AWS each server has its own and the client runs in Lambda.
        "floor_server_cpu_seconds": _round(floor_run.cpu.servers),
        "zdm_server_cpu_seconds": _round(ours.cpu.servers),
        "zdm_client_cpu_seconds": _round(ours.cpu.client),
        "reladiff_server_cpu_seconds": _round(theirs.cpu.servers) if theirs else None,
        "reladiff_client_cpu_seconds": _round(theirs.cpu.client) if theirs else None,
        "server_cpu_ratio_to_floor": _round(server_ratio, 2),
        "zdm_found": len(ours.keys),
        "reladiff_found": len(theirs.keys) if theirs else None,
        "same_keys": same_keys,
        "zdm_keys_equal_injected": ours.keys == truth,
        "reladiff_keys_equal_injected": (theirs.keys == truth) if theirs else None,
        "reladiff_ok": theirs.ok if theirs else None,
        "zdm": ours.extra,
        # how busy the CPUs were (others' work) just before the timed runs; over 0.10: noisy timings
        "cpu_busy_before": _round(busy),
        "goals": {
            "speedup_vs_reladiff_at_least": GOAL_SPEEDUP,
            "ratio_to_floor_at_most": GOAL_FLOOR_RATIO,
            "met": bool(
                speedup is not None
                and speedup >= GOAL_SPEEDUP
                and floor_ratio is not None
                and floor_ratio <= GOAL_FLOOR_RATIO
                and same_keys
            ),
        },
    }
    if args.json:
        emit_json(result)
    else:
        rows: list[list[Any]] = [
            [
                f"floor (1 scan per side, {args.workers} proc.)",
                round(floor, 2),
                _rate(args.rows, floor),
                _round(floor_run.cpu.servers, 2),
                _round(floor_run.cpu.client, 2),
                None,
                None,
                "-",
            ],
            [
                ours.name,
                round(ours.seconds, 2),
                _rate(args.rows, ours.seconds),
                _round(ours.cpu.servers, 2),
                _round(ours.cpu.client, 2),
                len(ours.keys),
                ours.keys == truth,
                ours.note,
            ],
        ]
        if theirs:
            rows.append(
                [
                    theirs.name,
                    round(theirs.seconds, 2),
                    _rate(args.rows, theirs.seconds),
                    _round(theirs.cpu.servers, 2),
                    _round(theirs.cpu.client, 2),
                    len(theirs.keys),
                    theirs.keys == truth,
                    theirs.note,
                ]
            )
        print(
            f"{args.rows:,} rows, {len(truth):,} differences injected, {args.workers} worker(s), "
            f"shared_buffers {args.shared_buffers or '256MB'}"
        )
        print_table(
            ["tool", "seconds", "rows/s", "server CPU-s", "client CPU-s", "differences", "= injected", "notes"], rows
        )
        print(
            f"zdm vs floor: {_fmt(floor_ratio)}x (goal <= {GOAL_FLOOR_RATIO}), "
            f"in the servers' CPU seconds {_fmt(server_ratio)}x; "
            f"reladiff vs zdm: {_fmt(speedup)}x (goal >= {GOAL_SPEEDUP}); "
            f"same keys found: {'-' if same_keys is None else ('yes' if same_keys else 'NO')}"
        )
    return 0 if ours.keys == truth else 1


def _rate(rows: int, seconds: float) -> float | None:
    return rows / seconds if seconds > 0 else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _reladiff_uri(server: PostgresServer) -> str:
    """reladiff accepts only the postgresql:// scheme."""
    return "postgresql://" + server_uri(server, DBNAME).removeprefix("postgres://")


if __name__ == "__main__":
    sys.exit(main())
