"""DDL that needs a lock on busy tables, without queueing behind a long holder for ever.

CREATE PUBLICATION ... FOR TABLE and ALTER PUBLICATION ... SET TABLE take a SHARE UPDATE EXCLUSIVE lock on
each table. A VACUUM, ANALYZE, CREATE INDEX (CONCURRENTLY too) or ALTER TABLE holding a conflicting lock
for an hour made the engine's start wait that hour, until its function timed out, with nothing saying
why; and while it waited, every later request for such a lock queued behind it. Each attempt here waits
at most `attempt_seconds` (lock_timeout), then steps out of the queue; past `wait_seconds` the error
names the sessions holding the locks. Row reads and writes never conflict with this lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import psycopg2
from psycopg2 import sql

from lambdas.core.db import Connection, execute, fetch_all, fetch_value
from lambdas.core.durations import fmt_seconds
from lambdas.core.engines.slot_creation import BlockingTransaction

# The granted relation locks that conflict with SHARE UPDATE EXCLUSIVE, with their sessions. No query text:
# it may hold data; the application (or, for autovacuum, the backend type) says what the session is.
_HOLDERS = """
SELECT DISTINCT ON (a.pid) a.pid, coalesce(a.usename, ''),
       coalesce(nullif(a.application_name, ''), a.backend_type, ''), coalesce(a.state, ''),
       coalesce(extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, a.backend_start)), 0)::float8, NULL
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.locktype = 'relation' AND l.relation = ANY(%(relations)s::oid[])
   AND l.mode IN ('ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                  'AccessExclusiveLock')
   AND l.pid <> pg_backend_pid()
 ORDER BY a.pid
"""


class TableLocksBusy(RuntimeError):
    """The DDL waited longer than allowed for other sessions' locks on the tables; it changed nothing."""

    def __init__(self, what: str, holders: list[BlockingTransaction], waited: float) -> None:
        self.holders = holders
        named = "; ".join(h.describe() for h in holders) or "sessions that had ended by the time they were looked up"
        super().__init__(
            f"{what} waited {fmt_seconds(waited)} for locks on the selected tables held by: {named}. It needs a SHARE "
            "UPDATE EXCLUSIVE lock on each table, which a running VACUUM, ANALYZE, CREATE INDEX (CONCURRENTLY too) "
            "or ALTER TABLE holds. Let it finish, or end it (SELECT pg_cancel_backend(<pid>)), then start again; "
            "nothing was created."
        )


def lock_holders(conn: Connection, relations: Sequence[int]) -> list[BlockingTransaction]:
    """The sessions holding a lock on `relations` (oids) that conflicts with SHARE UPDATE EXCLUSIVE."""
    return [BlockingTransaction(*row) for row in fetch_all(conn, _HOLDERS, {"relations": list(relations)})]


def run_waiting_for_locks(
    conn: Connection,
    statement: sql.Composable,
    relations: Sequence[int],
    *,
    what: str,
    wait_seconds: float,
    attempt_seconds: float = 2.0,
    pause_seconds: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run `statement` (DDL on `relations`) on `conn` (autocommit), each attempt under a lock_timeout of
    `attempt_seconds`, again until `wait_seconds` have passed; then raise TableLocksBusy."""
    started = clock()
    previous = fetch_value(conn, "SELECT current_setting('lock_timeout')")
    fetch_value(conn, "SELECT set_config('lock_timeout', %s, false)", (f"{max(1, round(attempt_seconds * 1000))}ms",))
    try:
        while True:
            try:
                execute(conn, statement)
                return
            except psycopg2.errors.LockNotAvailable:
                holders = lock_holders(conn, relations)
                if clock() - started + pause_seconds >= wait_seconds:
                    raise TableLocksBusy(what, holders, clock() - started) from None
                sleep(pause_seconds)
    finally:
        fetch_value(conn, "SELECT set_config('lock_timeout', %s, false)", (previous,))
