"""The write fence: after it, nothing commits on the fenced database, whoever the client is.

It is taken in this order, within `timeout` seconds or not at all:

1. Refuse to start when a role overrides `default_transaction_read_only` (ALTER ROLE ... SET):
   role settings win over database settings, so such a role would slip through.
2. The router starts holding its clients (pgbouncer: PAUSE of the writer and reader aliases;
   new transactions queue, running ones finish). Routers that cannot hold skip this.
3. `ALTER DATABASE <db> SET default_transaction_read_only = on`: every session that starts
   from now on is read-only from its first transaction (pgbouncer's new server connections
   included). The setting is durable, so a crashed controller leaves the fence in place.
4. Sessions that started before step 3 keep their old default and could still write, so
   each is ended (pg_terminate_backend) once ending it cannot cost a committed write:
   - idle (no transaction open): ended as soon as the router holds its clients (a pooler may
     hand an idle server connection to a client at any moment until then), or after the grace;
   - in a transaction: given `grace` seconds to finish; after that it is ended (its work
     was never committed, so nothing committed is lost; the client sees an error, as for any
     failed transaction) - or, with `terminate_long_transactions` off, waited for until the
     timeout, and then the whole fence is lifted and the attempt fails.
   A session that started after step 3 but holds a write transaction id (it set
   `transaction_read_only = off` itself) is treated like an old one in a transaction.
   Walsenders, replication workers and other background processes are never ended.
   Sessions `exempt_pids` names are left alone too: a change stream's own (its connector's probes and
   heartbeats on the source), which the cutover ends right before the catch-up's marker (`end_backends`),
   so that whatever they might commit still comes before the marker.
5. The fence holds when the router holds its clients and no session above is left.

If it cannot be taken in time, it is lifted (`ALTER DATABASE ... RESET`, router resumed) and
`FenceTimeout` says what stood in the way; the database is writable again as before.

What it does not stop: a session opened after the fence that explicitly runs `SET
default_transaction_read_only = off` and then writes between two checks. The fence ends such
sessions whenever it sees their write transaction id, but only the router's hold covers
clients completely; direct clients are expected to follow the database default.

Privileges: ALTER DATABASE needs the database's owner (or a superuser); ending other
sessions needs pg_signal_backend (or a superuser for superuser sessions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from psycopg2 import sql

from lambdas.core.db import Connection, execute, fetch_all, fetch_value
from lambdas.core.lsn import Lsn
from lambdas.core.routers.base import HoldHandle, TrafficRouter

SETTING = "default_transaction_read_only"


class FenceError(RuntimeError):
    """The fence was not taken; the database is as writable as before."""


class FenceTimeout(FenceError):
    """The fence could not be taken in time and was lifted."""


@dataclass(frozen=True)
class SessionView:
    """What the fence needs to know about one other client session of the database."""

    pid: int
    connected_before_fence: bool
    in_transaction: bool
    has_write_xid: bool
    transaction_seconds: float = 0.0
    user: str | None = None
    application: str | None = None

    def label(self) -> str:
        who = f"user {self.user}" if self.user else "unknown user"
        app = f", application {self.application!r}" if self.application else ""
        return f"pid {self.pid} ({who}{app})"


class SessionAction(StrEnum):
    END = "end"
    WAIT = "wait"


def decide(
    session: SessionView, *, router_held: bool, elapsed: float, grace: float, terminate_long: bool
) -> SessionAction | None:
    """What the fence does about `session` now; None: it cannot write, leave it alone."""
    if not session.connected_before_fence and not session.has_write_xid:
        return None
    if not session.in_transaction:
        return SessionAction.END if router_held or elapsed >= grace else SessionAction.WAIT
    if elapsed >= grace and terminate_long:
        return SessionAction.END
    return SessionAction.WAIT


@dataclass(frozen=True)
class EndedSession:
    pid: int
    user: str | None
    application: str | None
    in_transaction: bool
    transaction_seconds: float


@dataclass(frozen=True)
class FenceResult:
    database: str
    seconds: float
    router_held_clients: bool
    ended: list[EndedSession] = field(default_factory=list)


# -- single statements ---------------------------------------------------------------------------


def make_writable(conn: Connection) -> None:
    """Our own control sessions must write on a fenced database (state, setval, subscriptions),
    their commits reach disk before they return (see `fence_position`), and no lock wait of
    theirs lasts more than 10 s."""
    execute(conn, "SET default_transaction_read_only = off")
    execute(conn, "SET synchronous_commit = on")
    # A lock we wait for (ALTER DATABASE, DDL on subscriptions) must not hold the fence forever.
    execute(conn, "SET lock_timeout = '10s'")


def fence_position(conn: Connection) -> Lsn:
    """The WAL position every transaction committed before the fence lies within.

    The insert position, not `pg_current_wal_lsn()` (the write position): with asynchronous
    commit a committed transaction's WAL may still sit in WAL buffers, behind the write
    position. The fence is then set once more, a synchronous commit, which flushes the WAL up
    to and past that position at once; otherwise the WAL writer would flush it within
    `wal_writer_delay` and the walsender, which sends only flushed WAL, would wait for that.
    """
    lsn = Lsn.parse(fetch_value(conn, "SELECT pg_current_wal_insert_lsn()::text"))
    set_fence(conn)
    return lsn


def database_name(conn: Connection) -> str:
    return str(fetch_value(conn, "SELECT current_database()"))


def is_fenced(conn: Connection) -> bool:
    """Whether the database-wide read-only default is set (the durable part of the fence)."""
    return bool(
        fetch_value(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s, unnest(s.setconfig) c"
            " WHERE s.setrole = 0 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND c = 'default_transaction_read_only=on')",
        )
    )


def foreign_subscriptions(conn: Connection, exempt: Sequence[str] = ()) -> list[str]:
    """Enabled subscriptions of this database other than `exempt`: their apply workers are not client
    sessions and ignore the read-only default, so they would go on committing past the fence."""
    rows = fetch_all(
        conn,
        "SELECT subname FROM pg_subscription WHERE subenabled AND subdbid ="
        " (SELECT oid FROM pg_database WHERE datname = current_database()) AND NOT (subname = ANY(%s)) ORDER BY 1",
        (list(exempt),),
    )
    return [str(r[0]) for r in rows]


def role_overrides(conn: Connection) -> list[str]:
    """Roles whose own `default_transaction_read_only` setting would win over the database's."""
    rows = fetch_all(
        conn,
        "SELECT DISTINCT r.rolname FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole,"
        " unnest(s.setconfig) c WHERE s.setrole <> 0 AND split_part(c, '=', 1) = 'default_transaction_read_only'"
        " AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))"
        " ORDER BY 1",
    )
    return [str(r[0]) for r in rows]


def set_fence(conn: Connection) -> datetime:
    """Make the database read-only by default for new sessions; returns the server time after."""
    make_writable(conn)
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(database_name(conn))),
    )
    value: datetime = fetch_value(conn, "SELECT clock_timestamp()")
    return value


def lift_fence(conn: Connection) -> bool:
    """Remove the database-wide read-only default; True if it was set. Idempotent."""
    make_writable(conn)
    if not is_fenced(conn):
        return False
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(sql.Identifier(database_name(conn))),
    )
    return True


def other_sessions(conn: Connection, fenced_at: datetime, exempt: Sequence[int] = ()) -> list[SessionView]:
    rows = fetch_all(
        conn,
        "SELECT pid, backend_start < %s, xact_start IS NOT NULL, backend_xid IS NOT NULL,"
        " COALESCE(extract(epoch FROM clock_timestamp() - xact_start), 0)::float8, usename, application_name"
        " FROM pg_stat_activity"
        " WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s))",
        (fenced_at, list(exempt)),
    )
    return [SessionView(int(r[0]), bool(r[1]), bool(r[2]), bool(r[3]), float(r[4]), r[5], r[6]) for r in rows]


def prepared_transactions(conn: Connection) -> list[str]:
    """Two-phase transactions prepared in this database and not yet resolved.

    They have no session the fence could end, and COMMIT PREPARED is allowed in a read-only
    transaction: one committed after the fence would land after the fence position, on the old
    side only. The fence waits for them (it never rolls back what a coordinator may commit).
    """
    rows = fetch_all(
        conn,
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
    )
    return [str(r[0]) for r in rows]


def end_session(conn: Connection, pid: int) -> None:
    # No wait argument: pg_terminate_backend(pid, timeout) polls in 100 ms steps; we poll faster.
    execute(conn, "SELECT pg_terminate_backend(%s)", (pid,))


@dataclass(frozen=True)
class Backend:
    """One server process: its pid and start (microseconds since the epoch). Together they name it even
    after a restart that hands the pid to another process."""

    pid: int
    started_us: int


_BACKEND_START_US = "(extract(epoch FROM backend_start) * 1000000)::bigint"


def sessions_of(conn: Connection, user: str, application_like: str) -> list[Backend]:
    """The client sessions of this database under `user` whose application name is LIKE `application_like`."""
    rows = fetch_all(
        conn,
        f"SELECT pid, {_BACKEND_START_US} FROM pg_stat_activity"
        " WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND usename = %s"
        " AND application_name LIKE %s ORDER BY 1",
        (user, application_like),
    )
    return [Backend(int(r[0]), int(r[1])) for r in rows]


def end_backends(
    conn: Connection,
    backends: Sequence[Backend],
    *,
    timeout: float,
    poll_interval: float = 0.005,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """End those of `backends` still running (the same pid and start) and return once they are gone, or
    raise FenceError after `timeout` seconds: whatever they committed is then behind us in the WAL. Returns
    how many were ended (none the second time)."""
    if not backends:
        return 0
    pids, starts = [b.pid for b in backends], [b.started_us for b in backends]
    query = (
        "SELECT pid FROM pg_stat_activity WHERE (pid, "
        + _BACKEND_START_US
        + ") IN (SELECT * FROM unnest(%s::int[], %s::bigint[]))"
    )
    running = [int(r[0]) for r in fetch_all(conn, query, (pids, starts))]
    for pid in running:
        end_session(conn, pid)
    deadline = clock() + timeout
    left = running
    while left:
        if clock() > deadline:
            raise FenceError(f"session(s) {', '.join(map(str, left))} did not end within {timeout:g} s of being ended")
        sleep(poll_interval)
        left = [int(r[0]) for r in fetch_all(conn, query, (pids, starts))]
    return len(running)


# -- the fence --------------------------------------------------------------------------------


def take_fence(
    conn: Connection,
    router: TrafficRouter,
    *,
    grace: float,
    timeout: float,
    terminate_long: bool = True,
    exempt_pids: Sequence[int] = (),
    exempt_subscriptions: Sequence[str] = (),
    poll_interval: float = 0.002,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> FenceResult:
    """Fence writes on the database of `conn` (see the module docstring), or raise and leave it writable."""
    make_writable(conn)
    overrides = role_overrides(conn)
    if overrides:
        raise FenceError(
            f"role(s) {', '.join(overrides)} set default_transaction_read_only themselves, which would override the "
            "database-wide read-only fence: remove it (ALTER ROLE <role> [IN DATABASE <db>] RESET "
            "default_transaction_read_only) before the cutover"
        )
    subscriptions = foreign_subscriptions(conn, exempt_subscriptions)
    if subscriptions:
        raise FenceError(
            f"subscription(s) {', '.join(subscriptions)} write into this database: their apply workers would go on "
            "committing after the fence, and those writes would stay behind on this side. Disable them (and point "
            "what feeds them at the other side) before the cutover"
        )
    database = database_name(conn)
    started = clock()
    hold: HoldHandle | None = None
    ended: dict[int, EndedSession] = {}
    try:
        hold = router.begin_hold()
        fenced_at = set_fence(conn)
        while True:
            held = hold.done()
            elapsed = clock() - started
            sessions = other_sessions(conn, fenced_at, exempt_pids)
            pending: list[SessionView] = []
            for session in sessions:
                action = decide(session, router_held=held, elapsed=elapsed, grace=grace, terminate_long=terminate_long)
                if action is None:
                    continue
                pending.append(session)
                if action is SessionAction.END and session.pid not in ended:
                    end_session(conn, session.pid)
                    ended[session.pid] = EndedSession(
                        session.pid,
                        session.user,
                        session.application,
                        session.in_transaction,
                        round(session.transaction_seconds, 3),
                    )
            # Prepared transactions are read only once nothing else is left (not on every 2 ms poll of the pause).
            sessions_done = held and not pending
            prepared = prepared_transactions(conn) if sessions_done or elapsed >= timeout else []
            if sessions_done and not prepared:
                return FenceResult(database, clock() - started, hold.holding, list(ended.values()))
            if elapsed >= timeout:
                raise FenceTimeout(_timeout_message(database, timeout, hold, pending, terminate_long, prepared))
            sleep(poll_interval)
    except BaseException:
        _undo(conn, hold)
        raise


def _undo(conn: Connection, hold: HoldHandle | None) -> None:
    """Lift a half-taken fence; errors here must not hide the reason the fence failed."""
    try:
        lift_fence(conn)
    finally:
        if hold is not None:
            hold.cancel()


def _timeout_message(
    database: str,
    timeout: float,
    hold: HoldHandle,
    pending: Sequence[SessionView],
    terminate_long: bool,
    prepared: Sequence[str] = (),
) -> str:
    reasons = []
    if not hold.done():
        reasons.append(f"the router was still waiting for {hold.describe()}")
    in_tx = [s for s in pending if s.in_transaction]
    if in_tx:
        shown = "; ".join(f"{s.label()} in a transaction for {s.transaction_seconds:.1f}s" for s in in_tx[:5])
        more = f" and {len(in_tx) - 5} more" if len(in_tx) > 5 else ""
        hint = (
            " (cutover.terminate_long_transactions is off: such transactions are waited for, not ended)"
            if not terminate_long
            else ""
        )
        reasons.append(f"sessions still had transactions open: {shown}{more}{hint}")
    others = [s for s in pending if not s.in_transaction]
    if others:
        reasons.append(f"{len(others)} old session(s) had not exited yet")
    if prepared:
        reasons.append(
            f"{len(prepared)} prepared (two-phase) transaction(s) not yet committed or rolled back: "
            + ", ".join(repr(g) for g in prepared[:5])
        )
    why = "; ".join(reasons) or "unknown"
    return (
        f"could not fence writes on database {database!r} within {timeout:g}s, so the fence was lifted and the "
        f"database is writable as before: {why}. Retry when long transactions are done, or raise "
        "cutover.fence_timeout_seconds"
    )
