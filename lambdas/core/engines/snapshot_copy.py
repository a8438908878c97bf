"""Initial copy of key ranges in parallel, all from one exported snapshot.

The replication slot is created with EXPORT_SNAPSHOT; every copy session imports that
snapshot, so the copied rows are exactly the state at the slot's consistent point and the
subscription then streams from the slot with no gap and no overlap. Big tables are split
into key ranges so one table is copied by many streams at once (a plain subscription
copies each table through a single stream).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from lambdas.core.catalog import TableInfo
from lambdas.core.db import Connection, connection_lost, execute, unbound_session, when_reachable
from lambdas.core.ranges import KeyRange, range_predicate_literal
from lambdas.core.textform import pin_text_form

PIPE_BUFFER = 1 << 20


@dataclass(frozen=True)
class CopyChunk:
    table: TableInfo
    number: int
    key_range: KeyRange
    estimated_cost: int  # bytes on the source, to schedule the largest chunks first
    binary: bool = True  # FORMAT binary needs the same column types on both sides; text otherwise


@dataclass(frozen=True)
class ChunkCopied:
    table: str
    number: int
    rows: int
    seconds: float


class CopyFailed(RuntimeError):
    pass


ProgressCallback = Callable[[ChunkCopied], None]


def copy_columns(table: TableInfo) -> list[str]:
    return [c.name for c in table.columns if not c.generated]


def _format(chunk: CopyChunk) -> sql.Composable:
    return sql.SQL("binary" if chunk.binary else "text")


def copy_out_sql(source: Connection, chunk: CopyChunk) -> str:
    cols = copy_columns(chunk.table)
    predicate = range_predicate_literal(chunk.table.primary_key, chunk.table.key_types, chunk.key_range)
    query = sql.SQL("COPY (SELECT {cols} FROM {table} WHERE {pred}) TO STDOUT WITH (FORMAT {fmt})").format(
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        # ONLY: a plain table's inheritance children are copied as tables of their own, never into it.
        table=sql.SQL("ONLY {}").format(chunk.table.name.ident)
        if chunk.table.relkind == "r"
        else chunk.table.name.ident,
        pred=predicate,
        fmt=_format(chunk),
    )
    # COPY cannot take bind parameters: the bounds are quoted literals already. (mogrify would take a
    # '%' in a table or column name for a placeholder.)
    return query.as_string(source)


def copy_in_sql(target: Connection, chunk: CopyChunk) -> str:
    query = sql.SQL("COPY {table} ({cols}) FROM STDIN WITH (FORMAT {fmt})").format(
        table=chunk.table.name.ident,
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in copy_columns(chunk.table)),
        fmt=_format(chunk),
    )
    return query.as_string(target)


def copy_chunk(source: Connection, target: Connection, chunk: CopyChunk) -> int:
    """Stream one key range from the source session to the target session; returns rows copied."""
    out_sql = copy_out_sql(source, chunk)
    in_sql = copy_in_sql(target, chunk)
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=PIPE_BUFFER) as writer, source.cursor() as cur:
                cur.copy_expert(out_sql, writer, size=PIPE_BUFFER)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    producer = threading.Thread(target=produce, name=f"copy-out-{chunk.table.name}-{chunk.number}", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb", buffering=PIPE_BUFFER) as reader, target.cursor() as cur:
            cur.copy_expert(in_sql, reader, size=PIPE_BUFFER)
            rows = cur.rowcount
    except psycopg2.Error:
        producer.join()
        # A source that failed (a refused read) leaves the target a cut stream ("COPY file signature not
        # recognized"): name the cause. A pipe the failing target closed is no cause (not a database error).
        if errors and isinstance(errors[0], psycopg2.Error):
            raise _read_failed(chunk, errors[0]) from errors[0]
        raise
    finally:
        producer.join()
    if errors:
        raise _read_failed(chunk, errors[0])
    return int(rows)


def _read_failed(chunk: CopyChunk, error: BaseException) -> CopyFailed:
    return CopyFailed(f"reading {chunk.table.name} chunk {chunk.number} from the source failed: {error}")


@dataclass(frozen=True)
class CopySessionFactory:
    """How a copy worker opens its two sessions."""

    open_source: Callable[[], Connection]
    open_target: Callable[[], Connection]


def _prepare_source(conn: Connection, snapshot: str) -> None:
    # Text-format chunks (`CopyChunk.binary` false) travel as text forms: both sessions print and
    # parse them under the same settings. Before the transaction: SET TRANSACTION SNAPSHOT comes first in it.
    conn.autocommit = True
    pin_text_form(conn)
    unbound_session(conn)  # a chunk's COPY, and its transaction held between chunks, outlast a server's timeouts
    # A row-level security policy that hides rows from this role (one made after the engine checked) makes
    # the COPY fail instead of silently copying fewer rows.
    execute(conn, "SET row_security = off")
    conn.autocommit = False
    execute(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    execute(conn, "SET TRANSACTION SNAPSHOT %s", (snapshot,))


def _prepare_target(conn: Connection) -> None:
    conn.autocommit = True
    pin_text_form(conn)
    unbound_session(conn)  # COPY, index builds and ANALYZE of whole tables
    conn.autocommit = False
    # The source already enforced its constraints; firing FK triggers per copied row would
    # only slow the copy (the subscription's apply worker runs as 'replica' too).
    execute(conn, "SET session_replication_role = replica")
    # A chunk counted as committed must survive a crash of the target, which the copy's workers ride
    # through (`copy_in_parallel`), whatever the server's default: one WAL flush per chunk of thousands of rows.
    execute(conn, "SET synchronous_commit = on")


def copy_in_parallel(
    chunks: Sequence[CopyChunk],
    snapshot: str,
    sessions: CopySessionFactory,
    *,
    workers: int,
    reconnect_seconds: float,
    record_chunk: Callable[[Connection, CopyChunk, int], None] | None = None,
    recorded_rows: Callable[[Connection, CopyChunk], int | None] | None = None,
    on_table_copied: Callable[[Connection, TableInfo], None] | None = None,
    on_progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[ChunkCopied]:
    """Copy all chunks with `workers` session pairs; each target chunk commits on its own.

    `record_chunk(target, chunk, rows)` runs inside the chunk's target transaction, so the
    progress record and the data commit together. `on_table_copied(target, table)` runs in
    the worker that committed a table's last chunk (index builds and ANALYZE then overlap
    the other tables' copy). The first failure stops every worker and is raised; the caller
    decides how to clean up (the snapshot cannot be reused once the caller's exporting session ends).

    A worker that loses a connection (`db.connection_lost`: the target restarted, say) opens both
    again, importing the snapshot again (which the source still exports while the caller's session
    lives), for up to `reconnect_seconds` (`logical.copy_reconnect_seconds`: a crash, a restart, a
    Multi-AZ failover takes one to two minutes). The target's record (`recorded_rows`, read after the
    reconnect) then tells whether the chunk in flight committed; if not, it is copied again. Without
    `recorded_rows`, or when the source's exporting session went too, the copy fails as before.
    """
    work: queue.Queue[CopyChunk] = queue.Queue()
    for chunk in sorted(chunks, key=lambda c: -c.estimated_cost):
        work.put(chunk)
    chunks_left: dict[str, int] = {}
    tables: dict[str, TableInfo] = {}
    for chunk in chunks:
        chunks_left[str(chunk.table.name)] = chunks_left.get(str(chunk.table.name), 0) + 1
        tables[str(chunk.table.name)] = chunk.table
    done: list[ChunkCopied] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    imported = threading.Barrier(min(workers, len(chunks)) + 1, timeout=120)

    def open_pair() -> tuple[Connection, Connection]:
        source = target = None
        try:
            source = sessions.open_source()
            _prepare_source(source, snapshot)
            target = sessions.open_target()
            _prepare_target(target)
        except BaseException:
            _close(source, target)
            raise
        return source, target

    def reopen_pair(lost: BaseException, source: Connection, target: Connection) -> tuple[Connection, Connection]:
        """Both sessions again once the servers answer; `lost` is raised when that cannot help."""
        if recorded_rows is None or not connection_lost(lost):
            raise lost
        _close(source, target)
        try:
            # Not past another worker's failure for good (the source went too, say): the copy is over then
            return when_reachable(open_pair, reconnect_seconds, stop=lambda: bool(failures), clock=clock)
        except Exception as exc:
            if not connection_lost(exc) or failures:
                raise  # a snapshot gone with its exporting session (the source restarted) is not lost: start again
            raise CopyFailed(
                f"initial copy failed: a server went away and did not answer again within {reconnect_seconds:g}s: {exc}"
            ) from exc

    def chunk_copied(chunk: CopyChunk, rows: int, started: float) -> TableInfo | None:
        """Count a committed chunk; its table when that was the table's last chunk."""
        result = ChunkCopied(str(chunk.table.name), chunk.number, rows, time.monotonic() - started)
        with lock:
            done.append(result)
            chunks_left[result.table] -= 1
            table_finished = chunks_left[result.table] == 0
        if on_progress is not None:
            on_progress(result)
        return tables[result.table] if table_finished and on_table_copied is not None else None

    def worker() -> None:
        source: Connection | None = None
        target: Connection | None = None
        try:
            source, target = open_pair()
        except BaseException as exc:
            failures.append(exc)
            imported.abort()
            return
        try:
            imported.wait()
            while not failures:
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    break
                started = time.monotonic()
                try:
                    rows = copy_chunk(source, target, chunk)
                    if record_chunk is not None:
                        record_chunk(target, chunk, rows)
                    target.commit()
                except BaseException as exc:
                    source, target = reopen_pair(exc, source, target)
                    assert recorded_rows is not None
                    committed = recorded_rows(target, chunk)  # a commit cut off may have happened
                    target.commit()
                    if committed is None:
                        work.put(chunk)
                        continue
                    rows = committed
                finished = chunk_copied(chunk, rows, started)
                while finished is not None and on_table_copied is not None:
                    try:
                        on_table_copied(target, finished)  # builds what is missing: safe to run again
                        target.commit()
                        finished = None
                    except BaseException as exc:
                        source, target = reopen_pair(exc, source, target)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            failures.append(exc)
        finally:
            _close(source, target)

    threads = [
        threading.Thread(target=worker, name=f"copy-worker-{i}", daemon=True) for i in range(min(workers, len(chunks)))
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed; its error is raised below
        imported.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise CopyFailed(f"initial copy failed: {failures[0]}") from failures[0]
    return done


def _close(*conns: Connection | None) -> None:
    for conn in conns:
        if conn is None or conn.closed:
            continue
        try:
            conn.rollback()
        except psycopg2.Error:
            pass
        finally:
            conn.close()
