"""Where the cutover records its progress: `_zdm.cutover_state` and `_zdm.cutover_log` on the target.

Why the target: it is the database that survives a cutover, it stays writable for our
control session through both directions, and it already holds the engine's copy state.
The source is fenced (read-only) for most of the protocol and has no `_zdm` schema, so
that nothing of ours appears among its tables. When the target cannot be reached the
rollback does not need this record: the source's own fence and the router's writer tell
whether the writer ever left the source (see `rollback_kind`).

Each step is recorded with one statement (state row and log row together), after the
step's effect is in place. A step whose effect happened but whose record did not is
simply done again when the operation is re-run: every step is idempotent.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg2.errors
from psycopg2 import sql

from lambdas.core.cutover.steps import Operation, Progress, Status, Step
from lambdas.core.db import Connection, execute, fetch_all, fetch_one, fetch_value

SCHEMA = "_zdm"


class StateConflict(RuntimeError):
    pass


# The lock is held by a session: if its client vanishes without closing the socket (a network cut), the
# server must notice soon, or the lock would stay taken until the OS's keepalive (2 hours by default).
_KEEPALIVE = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}


def try_lock(conn: Connection, migration: str, *, wait_seconds: float = 0.0) -> bool:
    """One cutover, rollback or retire of a migration at a time (a session lock: a crash releases it,
    and a client gone silent within about a minute: server-side keepalives on the session).

    With `wait_seconds`, waits that long for the holder to finish (the session's lock_timeout is
    restored after); else gives up at once. `conn` is in autocommit mode (the runner's sessions are).
    """
    with conn.cursor() as cur:
        for name, value in _KEEPALIVE.items():
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
    key = (f"zdm-cutover:{migration}",)
    if wait_seconds <= 0:
        return bool(fetch_value(conn, "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", key))
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('lock_timeout')")
        row = cur.fetchone()
        previous = str(row[0]) if row else "0"
        cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, round(wait_seconds * 1000))}ms",))
        try:
            cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", key)
        except psycopg2.errors.LockNotAvailable:
            return False
        finally:
            # back to what the session had (make_writable's 10 s), not the server's default (often none)
            cur.execute("SELECT set_config('lock_timeout', %s, false)", (previous,))
    return True


def unlock(conn: Connection, migration: str) -> None:
    fetch_value(conn, "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (f"zdm-cutover:{migration}",))


def ensure_tables(conn: Connection) -> None:
    tables = ("cutover_state", "cutover_log", "cutover_rollbacks", "target_fence_kept")
    if fetch_value(
        conn, "SELECT bool_and(to_regclass(%s || '.' || t) IS NOT NULL) FROM unnest(%s) t", (SCHEMA, list(tables))
    ):
        return
    schema = sql.Identifier(SCHEMA)
    execute(conn, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    execute(
        conn,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.cutover_state ("
            " migration text NOT NULL, operation text NOT NULL, attempt int NOT NULL, status text NOT NULL,"
            " step text, fence_lsn pg_lsn, held_at timestamptz, released_at timestamptz, error text,"
            " started_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
            " updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), finished_at timestamptz,"
            " PRIMARY KEY (migration, operation))"
        ).format(schema),
    )
    execute(
        conn,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.cutover_log ("
            " migration text NOT NULL, operation text NOT NULL, attempt int NOT NULL, step text NOT NULL,"
            " seconds float8, at timestamptz NOT NULL DEFAULT clock_timestamp(), detail jsonb NOT NULL DEFAULT '{{}}')"
        ).format(schema),
    )
    execute(
        conn,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.cutover_rollbacks ("
            " migration text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(schema),
    )
    execute(
        conn,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.target_fence_kept ("
            " migration text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(schema),
    )


def note_rollback(conn: Connection, migration: str) -> None:
    """A rollback starts (under the migration's lock): a read shift of an execution started before is refused."""
    ensure_tables(conn)
    execute(
        conn,
        sql.SQL(
            "INSERT INTO {s}.cutover_rollbacks (migration) VALUES (%s)"
            " ON CONFLICT (migration) DO UPDATE SET at = clock_timestamp()"
        ).format(s=sql.Identifier(SCHEMA)),
        (migration,),
    )


def last_rollback(conn: Connection, migration: str) -> datetime | None:
    """When the migration's last rollback started (None: never, or no state on this database)."""
    if not _has(conn, "cutover_rollbacks"):
        return None
    value = fetch_value(
        conn,
        sql.SQL("SELECT at FROM {}.cutover_rollbacks WHERE migration = %s").format(sql.Identifier(SCHEMA)),
        (migration,),
    )
    return value if isinstance(value, datetime) else None


def _has(conn: Connection, table: str) -> bool:
    """Whether `_zdm.<table>` exists (a database no operation ever ran on has none)."""
    return bool(fetch_value(conn, "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.{table}",)))


def _exists(conn: Connection) -> bool:
    return _has(conn, "cutover_state")


def load(conn: Connection, migration: str, operation: Operation) -> Progress | None:
    if not _exists(conn):
        return None
    row = fetch_one(
        conn,
        sql.SQL(
            "SELECT status, attempt, step, fence_lsn::text, error FROM {}.cutover_state"
            " WHERE migration = %s AND operation = %s"
        ).format(sql.Identifier(SCHEMA)),
        (migration, operation.value),
    )
    if row is None:
        return None
    return Progress(operation, Status(row[0]), int(row[1]), Step(row[2]) if row[2] else None, row[3], row[4])


def begin(conn: Connection, migration: str, operation: Operation) -> Progress:
    """Start a new attempt (after none, or after an aborted one)."""
    ensure_tables(conn)
    row = fetch_one(
        conn,
        sql.SQL(
            "INSERT INTO {s}.cutover_state (migration, operation, attempt, status) VALUES (%s, %s, 1, 'running')"
            " ON CONFLICT (migration, operation) DO UPDATE SET attempt = {s}.cutover_state.attempt + 1,"
            " status = 'running', step = NULL, fence_lsn = NULL, held_at = NULL, released_at = NULL, error = NULL,"
            " started_at = clock_timestamp(), updated_at = clock_timestamp(), finished_at = NULL"
            " RETURNING attempt"
        ).format(s=sql.Identifier(SCHEMA)),
        (migration, operation.value),
    )
    assert row is not None
    return Progress(operation, Status.RUNNING, int(row[0]), None)


def record(
    conn: Connection,
    migration: str,
    progress: Progress,
    step: Step,
    seconds: float,
    detail: dict[str, Any] | None = None,
    *,
    fence_lsn: str | None = None,
    held_seconds: float | None = None,
    released: bool = False,
    done: bool = False,
) -> Progress:
    """Record `step` as completed (state and log in one statement)."""
    recorded = fetch_value(
        conn,
        sql.SQL(
            "WITH s AS (UPDATE {s}.cutover_state SET step = %(step)s, updated_at = clock_timestamp(),"
            " fence_lsn = COALESCE(%(lsn)s::pg_lsn, fence_lsn),"
            " held_at = CASE WHEN %(held)s::float8 IS NULL THEN held_at"
            "   ELSE clock_timestamp() - make_interval(secs => %(held)s::float8) END,"
            " released_at = CASE WHEN %(released)s THEN clock_timestamp() ELSE released_at END,"
            " status = CASE WHEN %(done)s THEN 'done' ELSE status END,"
            " finished_at = CASE WHEN %(done)s THEN clock_timestamp() ELSE finished_at END"
            " WHERE migration = %(m)s AND operation = %(op)s AND attempt = %(attempt)s RETURNING 1)"
            " INSERT INTO {s}.cutover_log (migration, operation, attempt, step, seconds, detail)"
            " SELECT %(m)s, %(op)s, %(attempt)s, %(step)s, %(seconds)s, %(detail)s::jsonb FROM s RETURNING 1"
        ).format(s=sql.Identifier(SCHEMA)),
        {
            "step": step.value,
            "lsn": fence_lsn,
            "held": held_seconds,
            "released": released,
            "done": done,
            "m": migration,
            "op": progress.operation.value,
            "attempt": progress.attempt,
            "seconds": seconds,
            "detail": json.dumps(detail or {}, default=str),
        },
    )
    if recorded is None:
        raise StateConflict(
            f"{progress.operation} attempt {progress.attempt} of {migration!r} is no longer the recorded one: "
            "another invocation started a new attempt"
        )
    return Progress(
        progress.operation,
        Status.DONE if done else progress.status,
        progress.attempt,
        step,
        fence_lsn or progress.fence_lsn,
    )


def mark(conn: Connection, migration: str, progress: Progress, status: Status, error: str | None = None) -> None:
    execute(
        conn,
        sql.SQL(
            "UPDATE {}.cutover_state SET status = %s, error = %s, updated_at = clock_timestamp(),"
            " finished_at = clock_timestamp() WHERE migration = %s AND operation = %s AND attempt = %s"
        ).format(sql.Identifier(SCHEMA)),
        (status.value, error, migration, progress.operation.value, progress.attempt),
    )


def close(conn: Connection, migration: str) -> list[str]:
    """Set the migration's records aside (an abandon, once its rollback and teardown are done): its state and log
    rows are renamed '<migration> (abandoned <time>)', kept to read, and the next cutover of the migration is a
    new one, from attempt 1. Returns what was set aside ("operation attempt N: status"); nothing the second time."""
    if not _exists(conn):
        return []
    rows = fetch_all(
        conn,
        sql.SQL(
            "WITH k AS (SELECT %(m)s || ' (abandoned ' || clock_timestamp()::text || ')' AS aside),"
            " s AS (UPDATE {s}.cutover_state SET migration = (SELECT aside FROM k) WHERE migration = %(m)s"
            "  RETURNING operation, attempt, status),"
            " l AS (UPDATE {s}.cutover_log SET migration = (SELECT aside FROM k) WHERE migration = %(m)s RETURNING 1)"
            " SELECT operation, attempt, status FROM s ORDER BY operation"
        ).format(s=sql.Identifier(SCHEMA)),
        {"m": migration},
    )
    return [f"{operation} attempt {attempt}: {status}" for operation, attempt, status in rows]


def keep_target_fence(conn: Connection, migration: str) -> None:
    """The target's fence is a rollback's after the cutover, kept on purpose (a client still pointed at the
    target must fail, not write where nobody reads): once the records are set aside (`close`), a rollback
    would otherwise take it for the read shift's and lift it. Idempotent."""
    ensure_tables(conn)
    execute(
        conn,
        sql.SQL("INSERT INTO {}.target_fence_kept (migration) VALUES (%s) ON CONFLICT (migration) DO NOTHING").format(
            sql.Identifier(SCHEMA)
        ),
        (migration,),
    )


def target_fence_kept(conn: Connection, migration: str) -> bool:
    if not _has(conn, "target_fence_kept"):
        return False
    return bool(
        fetch_value(
            conn,
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {}.target_fence_kept WHERE migration = %s)").format(
                sql.Identifier(SCHEMA)
            ),
            (migration,),
        )
    )


def forget_target_fence(conn: Connection, migration: str) -> None:
    """A new attempt's read shift fences the target itself: from then on its fence is that one's to lift.
    Only after `keep_target_fence` (the table exists)."""
    execute(
        conn,
        sql.SQL("DELETE FROM {}.target_fence_kept WHERE migration = %s").format(sql.Identifier(SCHEMA)),
        (migration,),
    )


def pause_seconds(conn: Connection, migration: str, operation: Operation) -> float | None:
    """From the fence to the release, across invocations (None until both happened)."""
    if not _exists(conn):
        return None
    value = fetch_value(
        conn,
        sql.SQL(
            "SELECT extract(epoch FROM released_at - held_at)::float8 FROM {}.cutover_state"
            " WHERE migration = %s AND operation = %s"
        ).format(sql.Identifier(SCHEMA)),
        (migration, operation.value),
    )
    return None if value is None else float(value)


def step_detail(conn: Connection, migration: str, progress: Progress, step: Step) -> dict[str, Any] | None:
    """What `step` recorded in this attempt of the operation (its last record; None when it has none)."""
    value = fetch_value(
        conn,
        sql.SQL(
            "SELECT detail FROM {}.cutover_log WHERE migration = %s AND operation = %s AND attempt = %s AND step = %s"
            " ORDER BY at DESC LIMIT 1"
        ).format(sql.Identifier(SCHEMA)),
        (migration, progress.operation.value, progress.attempt, step.value),
    )
    return dict(value) if value is not None else None


def history(conn: Connection, migration: str) -> list[dict[str, Any]]:
    """Every recorded step of every attempt, oldest first (for reports)."""
    if not _exists(conn):
        return []
    rows = fetch_all(
        conn,
        sql.SQL(
            "SELECT operation, attempt, step, seconds, at, detail FROM {}.cutover_log WHERE migration = %s ORDER BY at"
        ).format(sql.Identifier(SCHEMA)),
        (migration,),
    )
    return [
        {"operation": r[0], "attempt": r[1], "step": r[2], "seconds": r[3], "at": r[4].isoformat(), "detail": r[5]}
        for r in rows
    ]
