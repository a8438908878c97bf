"""WAL positions, and waiting until the target has applied the source's WAL up to one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg2 import sql

from lambdas.core.db import Connection, fetch_value


@dataclass(frozen=True, order=True)
class Lsn:
    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        high, _, low = text.partition("/")
        if not low:
            raise ValueError(f"{text!r} is not an LSN such as '16/B374D848'")
        return cls((int(high, 16) << 32) + int(low, 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __sub__(self, other: Lsn) -> int:
        return self.value - other.value


def current_lsn(conn: Connection) -> Lsn:
    """The end of all WAL inserted so far: past every commit that has returned to its client.

    pg_current_wal_lsn() is the *write* position; with synchronous_commit=off a committed
    transaction's record can lie beyond it, so waiting for it could miss that transaction.
    """
    return Lsn.parse(fetch_value(conn, "SELECT pg_current_wal_insert_lsn()::text"))


# Superuser-only unless granted (GRANT EXECUTE ON FUNCTION ...): a PostgreSQL 16 subscription owner
# that is no superuser (pg_create_subscription) may not read its own subscription's origin.
ORIGIN_PROGRESS = "pg_replication_origin_progress(text, boolean)"


def origin_progress_readable(conn: Connection) -> bool:
    """Whether the role may read replication origins' progress (`applied_lsn`)."""
    return bool(fetch_value(conn, "SELECT has_function_privilege(%s, 'EXECUTE')", (ORIGIN_PROGRESS,)))


def applied_lsn(target: Connection, subscription: str) -> Lsn | None:
    """What the target has applied for `subscription`: its replication origin's progress; None
    before the first commit, or where the role may not read it (`origin_progress_readable`).

    The origin moves as each replicated transaction commits on the target, so it is the
    fastest and most exact signal (the source's confirmed_flush_lsn waits for feedback).
    """
    if not origin_progress_readable(target):
        return None
    return _origin_progress(target, subscription)


def _origin_progress(target: Connection, subscription: str) -> Lsn | None:
    value = fetch_value(
        target,
        sql.SQL(
            "SELECT pg_replication_origin_progress('pg_' || s.oid, false)::text"
            " FROM pg_subscription s WHERE s.subname = %s AND s.subdbid ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        (subscription,),
    )
    return Lsn.parse(value) if value else None


def reported_replay_lsn(source: Connection, slot: str) -> Lsn | None:
    """What the subscriber last reported as applied, through the walsender feeding `slot`.

    When the subscriber has nothing pending it reports everything it received as done, so
    this passes positions after the last commit (WAL that carried no replicated change).
    """
    value = fetch_value(
        source,
        "SELECT r.replay_lsn::text FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
        (slot,),
    )
    return Lsn.parse(value) if value else None


def received_lsn(target: Connection, subscription: str) -> Lsn | None:
    """The last source position the subscription's apply worker has taken from the stream.

    The worker takes messages one at a time and applies (commits) each transaction before it
    takes the next message, and the walsender sends transactions in commit order and
    keepalives only after every transaction before their position. So once this is strictly
    past a position, every transaction that committed at or before it has been applied
    (a transaction's own messages carry positions at most its commit's end, and the worker
    notes a position before applying the message carrying it: hence strictly past).
    """
    value = fetch_value(
        target,
        "SELECT w.received_lsn::text FROM pg_stat_subscription w JOIN pg_subscription s ON s.oid = w.subid"
        " WHERE s.subname = %s AND w.relid IS NULL AND s.subdbid ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())",
        (subscription,),
    )
    return Lsn.parse(value) if value else None


class LsnWaitTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class LsnWaitResult:
    target_lsn: Lsn
    reached_lsn: Lsn
    waited_seconds: float
    signal: str  # which signal passed the position: 'origin', 'received' or 'walsender'


def wait_for_lsn(
    target: Connection,
    subscription: str,
    lsn: Lsn,
    *,
    timeout: float,
    source: Connection | None = None,
    slot: str | None = None,
    poll_interval: float = 0.001,
    max_poll_interval: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LsnWaitResult:
    """Block until the target has applied the source's WAL up to `lsn`, or raise LsnWaitTimeout.

    Reads the subscription's origin progress on the target (exact, moves at each applied
    commit). When `lsn` lies after the last replicated commit (other WAL followed it), the
    origin never gets there; the apply worker's received position strictly past `lsn` (a
    keepalive the walsender sends once it has decoded that far, see `received_lsn`) is
    accepted then, and, with `source` and `slot` given, the walsender's replay position (the
    subscriber's own report, which waits for the target to flush its WAL).
    """
    start = clock()
    interval = poll_interval
    last_seen: Lsn | None = None
    readable = origin_progress_readable(target)  # else the other two signals decide
    while True:
        origin = _origin_progress(target, subscription) if readable else None
        if origin is not None:
            last_seen = origin
            if origin >= lsn:
                return LsnWaitResult(lsn, origin, clock() - start, "origin")
        received = received_lsn(target, subscription)
        if received is not None and received > lsn:
            return LsnWaitResult(lsn, received, clock() - start, "received")
        if source is not None and slot is not None:
            replay = reported_replay_lsn(source, slot)
            if replay is not None and replay >= lsn:
                return LsnWaitResult(lsn, replay, clock() - start, "walsender")
        if clock() - start >= timeout:
            seen = str(last_seen) if last_seen else "nothing"
            raise LsnWaitTimeout(
                f"target did not apply up to {lsn} within {timeout:g}s (subscription {subscription!r} "
                f"has applied {seen}); check the subscription's worker in pg_stat_subscription"
            )
        sleep(interval)
        interval = min(interval * 2, max_poll_interval)
