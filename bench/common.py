"""Plumbing shared by the benchmarks: servers, progress, timing, external tools, row checks, output.

Conventions every benchmark follows:
- progress and diagnostics go to stderr (`log`), results to stdout: a table (`print_table`) or,
  with `--json`, exactly one JSON object (`emit_json`) and nothing else;
- servers come from `rehearsal.servers` and are always stopped (`bench_servers`);
- "the same rows" means the same count and the same aggregate hash of every row's text form,
  ordered by the primary key (`table_fingerprints`), computed under fixed session settings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from psycopg2 import sql

from lambdas.core.catalog import describe_tables
from lambdas.core.db import connect, execute, fetch_one, fetch_value
from lambdas.core.tables import TableName
from rehearsal.servers import PostgresServer, start_server

_T0 = time.monotonic()

# Settings that change a row's text form; both sides of a comparison use the same ones.
TEXT_FORM_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}


# -- progress --------------------------------------------------------------------------------


def log(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def ticker(describe: Callable[[], str], every: float = 5.0) -> Iterator[None]:
    """While the block runs, log `describe()` every `every` seconds (errors in it are shown, not raised)."""
    stop = threading.Event()
    started = time.monotonic()

    def run() -> None:
        while not stop.wait(every):
            try:
                text = describe()
            except Exception as exc:
                text = f"({type(exc).__name__}: {exc})"
            log(f"  ... {time.monotonic() - started:.0f}s: {text}")

    thread = threading.Thread(target=run, name="bench-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def database_size(dsn: str) -> str:
    """The database's size, human-readable (for tickers)."""
    conn = connect(dsn, application_name="zdm-bench-ticker")
    try:
        return str(fetch_value(conn, "SELECT pg_size_pretty(pg_database_size(current_database()))"))
    finally:
        conn.close()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy(sample_seconds: float = 1.0) -> float | None:
    """Fraction (0..1) of all CPUs busy over a short sample; None if it cannot be measured."""
    before = _cpu_times()
    time.sleep(sample_seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def check_quiet(before_what: str, threshold: float = 0.10) -> float | None:
    """Log how busy the CPUs are while we are idle; warn when others' work will skew our timings."""
    busy = cpu_busy()
    if busy is None:
        return None
    message = f"CPU busy before {before_what}: {busy:.0%} of {default_workers()} CPU(s) (not ours: we are idle)"
    if busy > threshold:
        message += " -- WARNING: other processes are using the CPUs; timings will be noisy"
    log(message)
    return busy


@dataclass
class CpuUse:
    """CPU seconds a timed block cost: on the database servers (all their processes) and in the
    client (this process's threads and the subprocesses it waited for). None where there is no /proc."""

    servers: float | None = None
    client: float | None = None


def _postmaster_pid(server: PostgresServer) -> int | None:
    try:
        return int((server.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_times(pid: int) -> tuple[int, list[int]] | None:
    """(parent pid, [utime, stime, cutime, cstime]) in clock ticks; None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), [int(v) for v in fields[11:15]]


def server_cpu_seconds(servers: Sequence[PostgresServer]) -> float | None:
    """CPU seconds the servers' processes have used so far: each postmaster's own and its exited
    (reaped) children's, and every live child's (backends, parallel workers, background processes)."""
    postmasters = {pid for pid in map(_postmaster_pid, servers) if pid is not None}
    if len(postmasters) != len(servers) or not Path("/proc").is_dir():
        return None
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        times = _proc_times(int(entry.name))
        if times is None:
            continue
        parent, (utime, stime, cutime, cstime) = times
        if int(entry.name) in postmasters:
            ticks += utime + stime + cutime + cstime
        elif parent in postmasters:
            ticks += utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _client_cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def cpu_used(servers: Sequence[PostgresServer]) -> Iterator[CpuUse]:
    """`with cpu_used(servers) as cpu: ...` then `cpu.servers` and `cpu.client` hold what the block cost.

    On one machine the servers and the client share the CPUs, so wall time follows their sum; on
    separate machines (a Lambda, two database instances) each server's share is what bounds it.
    """
    use = CpuUse()
    servers_before, client_before = server_cpu_seconds(servers), _client_cpu_seconds()
    try:
        yield use
    finally:
        servers_after = server_cpu_seconds(servers)
        if servers_before is not None and servers_after is not None:
            use.servers = servers_after - servers_before
        use.client = _client_cpu_seconds() - client_before


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values` by the nearest-rank method; 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def largest_gap(times: Sequence[float]) -> float:
    """The longest interval between consecutive moments in `times` (in any order); 0.0 for fewer than two."""
    ordered = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


@dataclass
class Timer:
    seconds: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Timer]:
    """`with timed() as t: ...` then `t.seconds` holds the block's wall-clock time."""
    timer = Timer()
    started = time.perf_counter()
    try:
        yield timer
    finally:
        timer.seconds = time.perf_counter() - started


# -- servers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_servers(
    names: Sequence[str], dbname: str | None = None, settings: Mapping[str, str] | None = None
) -> Iterator[list[PostgresServer]]:
    """Start one throwaway server per name (optionally creating `dbname` on each, with `settings` over
    the servers' defaults); always stopped."""
    servers: list[PostgresServer] = []
    try:
        for name in names:
            with timed() as t:
                server = start_server(name, settings=settings)
            servers.append(server)
            if dbname:
                server.create_database(dbname)
            log(f"server {name} up on port {server.port} ({t.seconds:.1f}s)")
        yield servers
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping server {server.name} failed: {exc}")
        if servers:
            log(f"stopped {len(servers)} server(s)")


def server_uri(server: PostgresServer, dbname: str = "postgres") -> str:
    """A postgres:// URI for tools that want one rather than a key=value DSN (pgcopydb)."""
    return f"postgres://postgres@127.0.0.1:{server.port}/{dbname}"


def settle(dsn: str) -> None:
    """VACUUM ANALYZE + CHECKPOINT: hint bits set, statistics fresh, no checkpoint pending.

    Freshly loaded rows make their first reader set hint bits (and write pages); settling
    first keeps that cost out of whichever tool happens to read the source first.
    """
    conn = connect(dsn, application_name="zdm-bench")
    try:
        execute(conn, "VACUUM ANALYZE")
        execute(conn, "CHECKPOINT")
    finally:
        conn.close()


# -- external tools --------------------------------------------------------------------------


@dataclass
class ToolRun:
    argv: list[str]
    returncode: int
    seconds: float
    output: str = field(repr=False)


def run_tool(
    argv: Sequence[str],
    *,
    prefix: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    user: int | None = None,
    group: int | None = None,
    log_file: Path | None = None,
) -> ToolRun:
    """Run an external command, echoing its stdout and stderr (merged) to our stderr line by line.

    The wall-clock time covers the whole process. Its output is kept (and written to `log_file`
    if given) for parsing; stdout stays clean for the benchmark's own result.
    """
    lines: list[str] = []
    full_env = dict(os.environ)
    full_env.update(env or {})
    started = time.perf_counter()
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=full_env,
        cwd=cwd,
        user=user,
        group=group,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print(f"  {prefix}| {line.rstrip()}", file=sys.stderr, flush=True)
        returncode = proc.wait()
    seconds = time.perf_counter() - started
    output = "".join(lines)
    if log_file is not None:
        log_file.write_text(output)
    return ToolRun(list(argv), returncode, seconds, output)


# -- row checks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    digest: str | None  # None for an empty table; "missing" when the table does not exist

    def __str__(self) -> str:
        return f"{self.rows} rows, {self.digest}"


MISSING = Fingerprint(-1, "missing")


def _fingerprint_sessions(dsn: str) -> Any:
    conn = connect(dsn, application_name="zdm-bench-check")
    for name, value in TEXT_FORM_SETTINGS.items():
        execute(conn, sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    execute(conn, "SET work_mem = '256MB'")
    return conn


def table_fingerprints(dsn: str, tables: Sequence[TableName]) -> dict[TableName, Fingerprint]:
    """Count and md5 of the concatenated md5 of each row's text, ordered by the primary key.

    Tables without a primary key are ordered by their whole row text. The aggregate string
    holds 32 bytes per row, so one table is limited to about 30 million rows (1 GB).
    """
    conn = _fingerprint_sessions(dsn)
    try:
        infos = describe_tables(conn, tables)
        result: dict[TableName, Fingerprint] = {}
        for table in tables:
            info = infos.get(table)
            if info is None:
                result[table] = MISSING
                continue
            order = (
                sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in info.primary_key)
                if info.primary_key
                else sql.SQL("t::text")
            )
            row = fetch_one(
                conn,
                sql.SQL("SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY {order})) FROM {table} AS t").format(
                    order=order, table=table.ident
                ),
            )
            assert row is not None
            result[table] = Fingerprint(int(row[0]), row[1])
        return result
    finally:
        conn.close()


def fingerprints_of(dsns: Mapping[str, str], tables: Sequence[TableName]) -> dict[str, dict[TableName, Fingerprint]]:
    """`table_fingerprints` of several databases at once (one thread, one server session each)."""
    with ThreadPoolExecutor(max_workers=len(dsns) or 1) as pool:
        futures = {label: pool.submit(table_fingerprints, dsn, tables) for label, dsn in dsns.items()}
        return {label: future.result() for label, future in futures.items()}


def mismatches(expected: Mapping[TableName, Fingerprint], actual: Mapping[TableName, Fingerprint]) -> list[str]:
    """One line per table whose fingerprint differs (empty when all match)."""
    problems = []
    for table, want in expected.items():
        got = actual.get(table, MISSING)
        if got == MISSING:
            problems.append(f"{table}: missing on the target")
        elif got != want:
            problems.append(f"{table}: source {want}, target {got}")
    return problems


# -- output ----------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """A plain aligned text table; numbers right-aligned, everything else left-aligned."""
    out = out or sys.stdout
    texts = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]
    numeric = [_numeric_column([row[i] for row in rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    print(line(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in texts:
        print(line(row), file=out)
    out.flush()


def _numeric_column(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def emit_json(result: Mapping[str, Any]) -> None:
    """The benchmark's result as exactly one JSON object on one stdout line."""
    print(json.dumps(dict(result), sort_keys=False), file=sys.stdout, flush=True)


def default_workers() -> int:
    return os.cpu_count() or 1
