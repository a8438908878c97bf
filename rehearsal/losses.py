"""After the run, read from the databases: what of the committed writes the writer's database lacks, and what
of the replication is left. Never from what the state machine said."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

from psycopg2 import sql

from lambdas.core.catalog import sequences_for_tables
from lambdas.core.config import Migration
from lambdas.core.db import connect, fetch_all, fetch_value
from lambdas.core.matviews import list_materialized_views
from lambdas.core.preflight.facts import replication_left
from lambdas.core.sequences import read_position
from rehearsal.workload import WorkloadStats


def missing_orders(dsn: str, order_ids: list[int]) -> int:
    """Committed inserts that the database holding the writer does not have: rows lost."""
    if not order_ids:
        return 0
    conn = connect(dsn)
    try:
        found = fetch_value(
            conn,
            sql.SQL("SELECT count(*) FROM {} WHERE id = ANY(%s)").format(sql.Identifier("orders")),
            (order_ids,),
        )
    finally:
        conn.close()
    return len(set(order_ids)) - int(found)


def missing_children(dsn: str, stats: WorkloadStats) -> int:
    """order_items and events rows inserted by committed new orders that the database holding the
    writer does not have (an events row the workload deleted since is not expected)."""
    if not stats.order_children:
        return 0
    conn = connect(dsn)
    try:
        lines = {order_id: n for order_id, n, _ in stats.order_children}
        found = dict(
            fetch_all(
                conn,
                "SELECT order_id, count(*) FROM order_items WHERE order_id = ANY(%s) GROUP BY order_id",
                (list(lines),),
            )
        )
        missing = sum(max(0, n - int(found.get(order_id, 0))) for order_id, n in lines.items())
        deleted = set(stats.deleted_events)
        events = [e for _, _, e in stats.order_children if e not in deleted]
        if events:
            present = int(fetch_value(conn, "SELECT count(*) FROM events WHERE id = ANY(%s::uuid[])", (events,)))
            missing += len(events) - present
    finally:
        conn.close()
    return missing


def lost_updates_and_deletes(dsn: str, stats: WorkloadStats) -> tuple[int, int]:
    """Committed updates and deletes the database holding the writer does not show.

    Every committed order update adds 1 to its total and returned the total after it, so an order
    updated k times has, at the end, the smallest total returned - 1 + k (only the workload writes
    totals); less means an increment was lost (a lost update the final compare cannot see when a
    later write on the target carried the stale row back to the old source). A committed delete's
    row must be gone."""
    seen: dict[int, tuple[Decimal, int]] = {}
    for order_id, total in stats.order_increments:
        low, count = seen.get(order_id, (Decimal(total), 0))
        seen[order_id] = (min(low, Decimal(total)), count + 1)
    conn = connect(dsn)
    try:
        updates_lost = 0
        if seen:
            rows = fetch_all(conn, "SELECT id, total FROM orders WHERE id = ANY(%s)", (list(seen),))
            found = {int(i): Decimal(t) for i, t in rows}
            for order_id, (low, count) in seen.items():
                expected = low - 1 + count
                actual = found.get(order_id)
                if actual is None or actual < expected:
                    updates_lost += int(expected - actual) if actual is not None else count
        deletes_lost = 0
        if stats.deleted_events:
            deletes_lost = int(
                fetch_value(conn, "SELECT count(*) FROM events WHERE id = ANY(%s::uuid[])", (stats.deleted_events,))
            )
    finally:
        conn.close()
    return updates_lost, deletes_lost


def sequences_behind(dsn: str, tables: list[Any]) -> list[str]:
    """Sequences on the database holding the writer whose next value is not past the largest value
    already in a column they feed: the next insert may reuse a value (a duplicate key, or a silent
    duplicate where nothing is unique, e.g. orders.invoice_no). Row compares cannot see this."""
    conn = connect(dsn)
    behind: list[str] = []
    try:
        for use in sequences_for_tables(conn, tables):
            position = read_position(conn, use.sequence)
            if position.increment <= 0:
                continue
            largest = fetch_value(
                conn,
                sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(use.column), use.table.ident),
            )
            if largest is not None and position.next_value <= int(largest):
                behind.append(f"{use.sequence} next {position.next_value} <= max({use.table}.{use.column}) {largest}")
    finally:
        conn.close()
    return behind


def stale_views(src: str, tgt: str) -> list[str]:
    """Materialized views the source answers and the target, now the writer, does not: unpopulated there,
    or holding another number of rows (the sample's view has a row per country, which the workload keeps)."""
    stale: list[str] = []
    source, target = connect(src), connect(tgt)
    try:
        on_target = {v.name: v for v in list_materialized_views(target)}
        for view in list_materialized_views(source):
            if not view.populated:
                continue
            twin = on_target.get(view.name)
            if twin is None or not twin.populated:
                stale.append(f"{view.name}: not populated on the target")
                continue
            count = sql.SQL("SELECT count(*) FROM {}").format(view.name.ident)
            rows, source_rows = fetch_value(target, count), fetch_value(source, count)
            if rows != source_rows:
                stale.append(f"{view.name}: {rows} rows on the target, {source_rows} on the source")
    finally:
        source.close()
        target.close()
    return stale


def replication_still_there(migration: Migration, src: str, tgt: str, *, back_only: bool = False) -> list[str]:
    """What of the migration's replication still exists, read from the databases (preflight's
    `replication_left`), not from what the state machine said."""
    with contextlib.closing(connect(src)) as source, contextlib.closing(connect(tgt)) as target:
        return replication_left(source, target, migration.slot_name, back_only=back_only)


def caught_up_position(retire: dict[str, Any]) -> str | None:
    """The target's position the source had applied when the retire dropped the reverse replication."""
    for step in retire.get("steps") or []:
        if step.get("step") == "catch_up":
            return str(step["detail"]["position"])
    return None
