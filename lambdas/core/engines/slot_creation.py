"""Create a logical replication slot without waiting blind for transactions that never end.

A new logical slot becomes consistent only once every transaction holding a transaction id when it
started has ended, so CREATE_REPLICATION_SLOT waits for them (on a transactionid lock). A session
left "idle in transaction" after a write would make it wait for ever: the engine's start would then
hang until its function times out, and its retry hang again, with nothing saying why. The slot is
created here while another session watches what blocks it; past `wait_seconds` of being blocked the
creation is cancelled (a slot that never became consistent is dropped by the server) and the error
names each blocking session and what to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from lambdas.core.db import Connection, fetch_all
from lambdas.core.durations import fmt_seconds

# What the walsender creating the slot waits for: the sessions holding the transaction locks it waits on, and
# prepared (two-phase) transactions, which pg_blocking_pids reports as pid 0: found by the lock's transaction id.
_BLOCKERS = """
SELECT b.pid, coalesce(b.usename, ''), coalesce(b.application_name, ''), coalesce(b.state, ''),
       coalesce(extract(epoch FROM clock_timestamp() - b.xact_start), 0)::float8, NULL
  FROM pg_stat_activity b
 WHERE b.pid = ANY(pg_blocking_pids(%(pid)s))
UNION ALL
SELECT 0, p.owner::text, '', 'prepared', extract(epoch FROM clock_timestamp() - p.prepared)::float8, p.gid
  FROM pg_prepared_xacts p JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid = p.transaction
 WHERE l.pid = %(pid)s AND NOT l.granted
 ORDER BY 5 DESC, 1
"""


@dataclass(frozen=True)
class BlockingTransaction:
    """A session whose open transaction a new slot waits for, or a prepared transaction (pid 0, its gid).
    No query text: it may hold data."""

    pid: int
    user: str
    application: str
    state: str
    seconds: float
    gid: str | None = None

    def describe(self) -> str:
        if self.gid is not None:
            return f"prepared transaction {self.gid!r} (owner {self.user}, prepared {fmt_seconds(self.seconds)} ago)"
        app = f", application {self.application}" if self.application else ""
        return f"pid {self.pid} (user {self.user}{app}, {self.state or 'unknown state'}, transaction open {fmt_seconds(self.seconds)})"


class SlotCreationBlocked(RuntimeError):
    """The slot waited longer than allowed for transactions open on the source; nothing was created."""

    def __init__(self, slot: str, blockers: list[BlockingTransaction], waited: float) -> None:
        self.slot = slot
        self.blockers = blockers
        named = "; ".join(b.describe() for b in blockers)
        super().__init__(
            f"creating replication slot {slot} waited {waited:.0f} s for {len(blockers)} transaction(s) open on "
            f"the source to end: {named}. A new slot needs every transaction that held a transaction id when it "
            "started to end. Let them finish, or end them (a session: SELECT pg_terminate_backend(<pid>); as its "
            "owner or a member of pg_signal_backend; a prepared transaction: COMMIT PREPARED or ROLLBACK PREPARED "
            "'<gid>', as its coordinator would), then start again; no slot was created."
        )


def blocking_transactions(monitor: Connection, pid: int) -> list[BlockingTransaction]:
    """The sessions and prepared transactions the backend `pid` waits for, the longest open first."""
    return [BlockingTransaction(*row) for row in fetch_all(monitor, _BLOCKERS, {"pid": pid})]


@dataclass(frozen=True)
class CreatedSlot:
    consistent_lsn: str
    snapshot: str | None  # the exported snapshot's name, valid while the replication connection stays idle


def create_logical_slot(
    replication: Connection,
    monitor: Connection,
    slot: str,
    *,
    export_snapshot: bool,
    wait_seconds: float,
    poll_seconds: float = 0.5,
    on_blocked: Callable[[list[BlockingTransaction]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CreatedSlot:
    """CREATE_REPLICATION_SLOT ... LOGICAL pgoutput on `replication` (a LogicalReplicationConnection),
    watched from `monitor` (a plain session on the same server). `on_blocked` hears who blocks it, each poll."""
    statement = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}").format(
        sql.Identifier(slot), sql.SQL("EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT")
    )
    walsender = replication.get_backend_pid()
    outcome: list[tuple[object, ...] | BaseException | None] = []

    def create() -> None:
        try:
            with replication.cursor() as cur:
                cur.execute(statement)
                outcome.append(cur.fetchone())
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=create, name=f"create-slot-{slot}", daemon=True)
    started = clock()
    worker.start()
    blockers: list[BlockingTransaction] = []
    cancelled = False
    while worker.is_alive():
        worker.join(poll_seconds)
        if not worker.is_alive():
            break
        blockers = blocking_transactions(monitor, walsender)
        if blockers and on_blocked is not None:
            on_blocked(blockers)
        if blockers and clock() - started > wait_seconds:
            replication.cancel()
            cancelled = True
            worker.join()
            break
    result = outcome[0] if outcome else None
    if isinstance(result, BaseException):
        if cancelled and isinstance(result, psycopg2.errors.QueryCanceled):
            raise SlotCreationBlocked(slot, blockers, clock() - started) from None
        raise result
    if result is None:
        raise RuntimeError(f"CREATE_REPLICATION_SLOT {slot} returned nothing")
    return CreatedSlot(consistent_lsn=str(result[1]), snapshot=str(result[2]) if result[2] is not None else None)
