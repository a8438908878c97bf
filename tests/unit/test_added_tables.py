"""Tables created on the source after the start: which they are, and what the status says (no servers)."""

from __future__ import annotations

from dataclasses import replace

from lambdas.core.catalog import Column, TableInfo
from lambdas.core.engines.base import TableStatus, TableSyncState
from lambdas.core.engines.logical import added_tables_problem, tables_added_after_start
from lambdas.core.schema_compare import REVERSE_SIDES
from lambdas.core.tables import TableName

ORDERS, COUPONS, EVENTS, EVENTS_2026 = (TableName("public", n) for n in ("orders", "coupons", "events", "events_2026"))


def info(name: TableName, oid: int, **changes: object) -> TableInfo:
    base = TableInfo(
        name=name,
        oid=oid,
        relkind="r",
        persistence="p",
        replica_identity="d",
        primary_key=("id",),
        replica_identity_index=None,
        columns=(Column("id", "bigint", True, True),),
        estimated_rows=0,
        size_bytes=8192,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def held(*names: TableName) -> list[TableStatus]:
    return [TableStatus(str(n), TableSyncState.READY) for n in names]


def test_a_selected_table_the_subscription_does_not_hold_is_added_after_the_start() -> None:
    on_source = {ORDERS: info(ORDERS, 1), COUPONS: info(COUPONS, 2)}
    assert tables_added_after_start(on_source, held(ORDERS)) == [COUPONS]
    assert tables_added_after_start(on_source, held(ORDERS, COUPONS)) == []


def test_a_new_partition_of_a_replicated_partitioned_table_is_not_a_table_of_its_own() -> None:
    # Given a partitioned table the subscription holds (through its root), and a partition made since
    on_source = {
        EVENTS: info(EVENTS, 10, relkind="p"),
        EVENTS_2026: info(EVENTS_2026, 11, ancestor_oids=(10,)),
    }
    # Then nothing is to add: its rows travel through the root (a partition the target lacks is drift)
    assert tables_added_after_start(on_source, held(EVENTS)) == []


def test_the_problem_says_what_to_do_first_for_a_table_the_target_lacks_or_holds_otherwise() -> None:
    # Given coupons missing on the target and orders there, alike and empty (addable)
    text = added_tables_problem([COUPONS, ORDERS], {ORDERS}, [ORDERS])
    assert text.startswith("public.coupons, public.orders: created on the source after the start, not replicated")
    assert text.endswith(
        "first create public.coupons on the target as on the source (pg_dump --schema-only --table=...)"
    )
    # Given orders on the target but not addable (a difference, or rows there)
    held = added_tables_problem([ORDERS], {ORDERS}, [])
    assert held.endswith(
        "public.orders must first be alike on both sides (see the schema differences) and empty on the target"
    )
    # And from the back replication's side, the databases are named the other way round
    assert "created on the target after the start" in added_tables_problem([COUPONS], set(), sides=REVERSE_SIDES)
