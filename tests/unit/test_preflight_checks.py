"""The pure preflight checks, over hand-built facts (no servers)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from lambdas.core import schema_compare
from lambdas.core.catalog import Column, Partition, SequenceUse, TableInfo
from lambdas.core.engines.slot_creation import BlockingTransaction
from lambdas.core.lsn import Lsn
from lambdas.core.matviews import MaterializedView
from lambdas.core.preflight import checks, format_report
from lambdas.core.preflight.facts import (
    ConnectionFacts,
    OutsideReference,
    PreflightFacts,
    RoleFacts,
    SentWrongly,
    ServerFacts,
    ServerVersion,
    TableFacts,
    WalSample,
)
from lambdas.core.preflight.model import CheckResult, PreflightReport
from lambdas.core.statement_logging import LogSetting
from lambdas.core.tables import TableName

MB = 1024**2
GB = 1024**3
ORDERS = TableName("public", "orders")
ITEMS = TableName("public", "items")


def server(**changes: Any) -> ServerFacts:
    """A well-configured PostgreSQL 15 server, connected as a superuser."""
    base = ServerFacts(
        version=ServerVersion(150004, "15.4"),
        database="app",
        wal_level="logical",
        is_rds=False,
        max_replication_slots=10,
        max_wal_senders=10,
        max_logical_replication_workers=4,
        max_sync_workers_per_subscription=2,
        max_worker_processes=8,
        max_slot_wal_keep_size=None,
        slots_used=0,
        wal_senders_used=0,
        background_workers_used=1,
        logical_workers_used=0,
        origins_used=0,
        role=RoleFacts(
            "postgres", superuser=True, replication=True, member_of=frozenset(), can_create_in_database=True
        ),
        extensions={"plpgsql": "1.0"},
        available_extensions=frozenset({"plpgsql", "citext", "hstore"}),
        large_objects=0,
    )
    return replace(base, **changes)


def role(**changes: Any) -> RoleFacts:
    base = RoleFacts("app", superuser=False, replication=False, member_of=frozenset(), can_create_in_database=True)
    return replace(base, **changes)


def table(name: TableName = ORDERS, **changes: Any) -> TableInfo:
    base = TableInfo(
        name=name,
        oid=16384,
        relkind="r",
        persistence="p",
        replica_identity="d",
        primary_key=("id",),
        replica_identity_index=None,
        columns=(Column("id", "bigint", True, True), Column("note", "text", False)),
        estimated_rows=0,
        size_bytes=8192,
    )
    return replace(base, **changes)


def tables(*infos: TableInfo, target: list[TableInfo] | None = None, **changes: Any) -> TableFacts:
    """Selection of `infos` on the source; the target holds the same tables unless `target` is given."""
    infos = infos or (table(),)
    names = [i.name for i in infos]
    target_infos = list(infos) if target is None else target
    base = TableFacts(
        include=["public.*"],
        exclude=[],
        candidates=sorted(names),
        selected=sorted(names),
        unmatched_include=[],
        source={i.name: i for i in infos},
        target={i.name: i for i in target_infos},
        target_rows={},
        target_unreadable=[],
        source_not_owned=[],
        source_unreadable=[],
        sequences=[],
        copy_bytes=sum(i.size_bytes for i in infos),
    )
    return replace(base, **changes)


def facts(**changes: Any) -> PreflightFacts:
    base = PreflightFacts(
        source=server(),
        target=server(),
        tables=tables(),
        wal=WalSample(Lsn(0), Lsn(0), 1.0),
        free_disk_bytes=100 * GB,
    )
    return replace(base, **changes)


def wal(bytes_per_second: float) -> WalSample:
    return WalSample(Lsn(1000), Lsn(1000 + int(bytes_per_second)), 1.0)


# --- the whole report --------------------------------------------------------------------------


def test_good_facts_pass_every_check() -> None:
    # Given facts of a well-prepared pair
    # When every check runs
    report = checks.evaluate(facts())

    # Then all pass, one result per check, in a stable order
    assert report.ok
    assert [c.status for c in report.checks] == ["pass"] * len(checks.CHECKS)
    assert [c.name for c in report.checks][:2] == ["server_version", "wal_level"]
    assert len({c.name for c in report.checks}) == len(checks.CHECKS)


def test_report_ok_means_no_failure_and_warnings_do_not_block() -> None:
    warn = CheckResult("a", "warn", "m", "do x", ["d"])
    fail = CheckResult("b", "fail", "m", "do y")
    assert PreflightReport([warn]).ok
    report = PreflightReport([warn, fail, CheckResult("c", "pass", "m")])
    assert not report.ok
    assert report.failures == [fail] and report.warnings == [warn]
    assert report.get("b") is fail and "b" in report and "z" not in report
    with pytest.raises(KeyError, match="no preflight check named 'z'"):
        report.get("z")
    assert report.to_dict()["ok"] is False
    assert report.to_dict()["checks"][0] == {
        "name": "a",
        "status": "warn",
        "measured": "m",
        "remedy": "do x",
        "details": ["d"],
    }


def test_format_report_shows_status_details_fix_and_verdict() -> None:
    report = PreflightReport(
        [
            CheckResult("wal_level", "pass", "source wal_level=logical"),
            CheckResult("target_empty", "fail", "1 of 2 target tables hold rows", "TRUNCATE public.orders;", ["x"]),
        ]
    )
    text = format_report(report)
    lines = text.splitlines()
    assert lines[2].startswith("PASS  wal_level") and "source wal_level=logical" in lines[2]
    assert lines[3].startswith("FAIL  target_empty")
    assert "      - x" in lines
    assert "      fix: TRUNCATE public.orders;" in lines
    assert lines[-1] == "preflight: 1 passed, 0 warning(s), 1 failed: NOT ready: fix every FAIL above"


# --- servers -----------------------------------------------------------------------------------


def test_server_older_than_10_fails() -> None:
    result = checks.check_server_version(facts(source=server(version=ServerVersion(90624, "9.6.24"))))
    assert result.status == "fail"
    assert result.details == ["source runs PostgreSQL 9.6.24"]
    assert "PostgreSQL 10 or later" in result.remedy


def test_target_older_major_than_source_warns() -> None:
    result = checks.check_server_version(
        facts(
            source=server(version=ServerVersion(160002, "16.2")), target=server(version=ServerVersion(150004, "15.4"))
        )
    )
    assert result.status == "warn"
    assert result.measured == "source 16.2, target 15.4"
    assert "major version 16 or later" in result.remedy


def test_newer_target_passes() -> None:
    result = checks.check_server_version(facts(target=server(version=ServerVersion(160002, "16.2"))))
    assert result.status == "pass"


def test_wal_level_replica_fails_with_restart_remedy() -> None:
    result = checks.check_wal_level(facts(source=server(wal_level="replica")))
    assert result.status == "fail"
    assert "ALTER SYSTEM SET wal_level = 'logical'" in result.remedy and "restart" in result.remedy


def test_wal_level_on_rds_points_to_the_parameter_group() -> None:
    result = checks.check_wal_level(facts(source=server(wal_level="replica", is_rds=True)))
    assert result.status == "fail"
    assert result.measured == "source wal_level=replica (RDS)"
    assert "rds.logical_replication = 1" in result.remedy and "parameter group" in result.remedy
    assert "ALTER SYSTEM" not in result.remedy


@pytest.mark.parametrize(
    ("limit", "used", "status"),
    [(10, 0, "pass"), (2, 0, "pass"), (3, 2, "fail"), (1, 0, "fail"), (0, 0, "fail")],
)
def test_source_slots_need_two_free(limit: int, used: int, status: str) -> None:
    result = checks.check_source_replication_slots(facts(source=server(max_replication_slots=limit, slots_used=used)))
    assert result.status == status
    if status == "fail":
        assert f"Raise max_replication_slots to at least {used + 2}" in result.remedy
        assert "pg_drop_replication_slot" in result.remedy


def test_subscription_copy_wants_a_slot_per_sync_worker() -> None:
    # Given the subscription copy (table-sync workers open their own slots) and 2 sync workers
    two_tables = tables(table(ORDERS), table(ITEMS, oid=2))
    result = checks.check_source_replication_slots(
        facts(copy_method="subscription", tables=two_tables, source=server(max_replication_slots=2))
    )
    # Then two free slots are enough to start, but fewer than wanted
    assert result.status == "warn"
    assert "want 3" in result.measured


def test_wal_senders_in_use_are_subtracted() -> None:
    result = checks.check_source_wal_senders(facts(source=server(max_wal_senders=4, wal_senders_used=3)))
    assert result.status == "fail"
    assert result.measured.startswith("WAL senders on the source: 1 free (max_wal_senders=4, 3 in use)")
    assert "ALTER SYSTEM SET max_wal_senders = 5" in result.remedy


def test_rds_capacity_remedy_uses_the_parameter_group() -> None:
    result = checks.check_source_wal_senders(facts(source=server(max_wal_senders=1, is_rds=True)))
    assert "DB parameter group" in result.remedy and "ALTER SYSTEM" not in result.remedy


def test_target_without_free_logical_worker_fails() -> None:
    result = checks.check_target_subscription_capacity(
        facts(target=server(max_logical_replication_workers=4, logical_workers_used=4))
    )
    assert result.status == "fail"
    assert "max_logical_replication_workers: 0 free of 4, need 1" in result.details
    assert "max_logical_replication_workers = 5" in result.remedy


def test_target_without_free_origin_or_worker_process_fails() -> None:
    result = checks.check_target_subscription_capacity(
        facts(target=server(max_replication_slots=2, origins_used=2, max_worker_processes=3, background_workers_used=3))
    )
    assert result.status == "fail"
    assert "max_replication_slots = 3" in result.remedy and "max_worker_processes = 4" in result.remedy


def test_target_capacity_with_unreadable_origins_judges_the_setting() -> None:
    result = checks.check_target_subscription_capacity(facts(target=server(origins_used=None)))
    assert result.status == "pass"
    assert result.measured.startswith("origins free ?")


def test_subscription_checks_do_not_apply_to_dms() -> None:
    weak = server(max_logical_replication_workers=0, role=role())
    assert checks.check_target_subscription_capacity(facts(engine="dms", target=weak)).status == "pass"
    assert checks.check_target_role(facts(engine="dms", target=weak)).status == "pass"


def test_target_that_cannot_publish_back_fails_reverse_replication() -> None:
    result = checks.check_reverse_replication(facts(target=server(wal_level="replica", max_wal_senders=0)))
    assert result.status == "fail"
    assert result.details == [
        "target wal_level is 'replica', not 'logical'",
        "no free WAL sender on the target (0 of 0 used)",
    ]
    assert "rollback" in result.remedy and "wal_level = 'logical'" in result.remedy


# --- roles -------------------------------------------------------------------------------------


def test_source_role_without_replication_fails() -> None:
    result = checks.check_source_role(facts(source=server(role=role())))
    assert result.status == "fail"
    assert result.details == ["role app may not replicate (no REPLICATION attribute, not superuser)"]
    assert "ALTER ROLE app REPLICATION;" in result.remedy


def test_source_role_on_rds_is_told_to_join_rds_replication() -> None:
    result = checks.check_source_role(facts(source=server(is_rds=True, role=role())))
    assert result.status == "fail"
    assert "GRANT rds_replication TO app;" in result.remedy
    assert result.measured.endswith("rds_replication=no")


@pytest.mark.parametrize(
    "rights",
    [
        {"replication": True},
        {"member_of": frozenset({"rds_replication"})},
        {"superuser": True, "can_create_in_database": False},
    ],
)
def test_source_role_that_can_replicate_and_owns_the_tables_passes(rights: dict[str, Any]) -> None:
    assert checks.check_source_role(facts(source=server(role=role(**rights)))).status == "pass"


def test_source_role_must_own_and_read_the_tables_and_create_in_the_database() -> None:
    result = checks.check_source_role(
        facts(
            source=server(role=role(replication=True, can_create_in_database=False)),
            tables=tables(source_not_owned=[ORDERS], source_unreadable=[ORDERS]),
        )
    )
    assert result.status == "fail"
    assert result.details == [
        "role app does not own public.orders (CREATE PUBLICATION ... FOR TABLE needs the owner)",
        "role app has no CREATE privilege on database app (publications need it)",
        "role app may not SELECT from public.orders (the copy reads them)",
    ]
    assert "GRANT CREATE ON DATABASE app TO app;" in result.remedy


def test_target_role_on_15_must_be_superuser() -> None:
    result = checks.check_target_role(facts(target=server(role=role())))
    assert result.status == "fail"
    assert "PostgreSQL 15 lets only superusers create subscriptions" in result.remedy


def test_target_role_on_16_needs_pg_create_subscription() -> None:
    pg16 = ServerVersion(160002, "16.2")
    missing = checks.check_target_role(facts(target=server(version=pg16, role=role())))
    assert missing.status == "fail"
    assert "GRANT pg_create_subscription TO app;" in missing.remedy
    granted = role(member_of=frozenset({"pg_create_subscription"}))
    assert checks.check_target_role(facts(target=server(version=pg16, role=granted))).status == "pass"


def test_target_role_rds_superuser_passes() -> None:
    rds = server(is_rds=True, role=role(member_of=frozenset({"rds_superuser"})))
    assert checks.check_target_role(facts(target=rds)).status == "pass"


# --- tables ------------------------------------------------------------------------------------


def test_include_pattern_matching_nothing_fails_with_a_suggestion() -> None:
    selection = tables(include=["public.ordres", "public.*"], unmatched_include=["public.ordres"])
    result = checks.check_table_selection(facts(tables=selection))
    assert result.status == "fail"
    assert result.details == [
        "include pattern 'public.ordres' matches no table on the source; did you mean public.orders?"
    ]


def test_empty_selection_fails() -> None:
    result = checks.check_table_selection(facts(tables=tables(selected=[], source={}, target=[])))
    assert result.status == "fail"
    assert "no table is selected" in result.details[0]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"primary_key": ()}, "public.orders: no primary key (replica identity default)"),
        ({"replica_identity": "n"}, "public.orders: REPLICA IDENTITY NOTHING"),
        ({"replica_identity": "i"}, "public.orders: REPLICA IDENTITY USING INDEX, but the index no longer exists"),
    ],
)
def test_table_without_usable_identity_fails_by_name(changes: dict[str, Any], problem: str) -> None:
    result = checks.check_replica_identity(facts(tables=tables(table(**changes), table(ITEMS, oid=2))))
    assert result.status == "fail"
    assert result.details == [problem]
    assert result.measured == "1 of 2 selected tables have a primary key or usable replica identity"
    assert "FAILS ON THE SOURCE" in result.remedy


def test_identity_by_index_passes_and_full_without_key_warns() -> None:
    by_index = table(primary_key=(), replica_identity="i", replica_identity_index="orders_code")
    assert checks.check_replica_identity(facts(tables=tables(by_index))).status == "pass"
    full = checks.check_replica_identity(facts(tables=tables(table(primary_key=(), replica_identity="f"))))
    assert full.status == "warn"
    assert full.details == ["public.orders: REPLICA IDENTITY FULL, no primary key"]


def test_unlogged_table_fails() -> None:
    result = checks.check_unlogged_tables(facts(tables=tables(table(persistence="u"))))
    assert result.status == "fail"
    assert result.details == ["public.orders: UNLOGGED"]


def test_row_level_security_fails_per_side_naming_role_and_tables_and_passes_when_no_policy_filters() -> None:
    # Given a source role whose reads of orders (and a partition read through its root) a policy filters,
    # and a target role whose reads of orders it filters too
    hidden = table(row_security_active=True)
    partition = table(TableName("public", "orders_2024"), row_security_active=True)
    given = facts(
        source=server(role=role(name="mig")),
        target=server(role=role(name="mig_t")),
        tables=tables(hidden, target=[hidden], partitions={partition.name: partition}),
    )
    # When the check runs
    result = checks.check_row_level_security(given)
    # Then it fails, one line per side, and names the grant for each role
    assert result.status == "fail"
    assert result.measured == "tables whose policies hide rows from the migration's role: source 2, target 1"
    assert result.details == [
        "source: row-level security policies filter what role mig reads from public.orders, public.orders_2024 "
        "(the copy and the validation would silently see only those rows)",
        "target: row-level security policies filter what role mig_t reads from public.orders "
        "(the validation would silently see only those rows)",
    ]
    assert "ALTER ROLE mig BYPASSRLS; ALTER ROLE mig_t BYPASSRLS;" in result.remedy
    # And tables no policy filters pass
    assert checks.check_row_level_security(facts()).status == "pass"


def test_open_transactions_a_slot_would_wait_for_warn_naming_each_and_what_to_do() -> None:
    # Given a session idle in a transaction that wrote, two hours ago, and a prepared transaction
    session = BlockingTransaction(4242, "app", "nightly-report", "idle in transaction", 7200.0)
    prepared = BlockingTransaction(0, "xa", "", "prepared", 300.0, gid="branch-7")
    given = facts(source=server(open_write_transactions=(session, prepared)))
    # When the check runs
    result = checks.check_open_transactions(given)
    # Then it warns, naming both and how to end each
    assert result.status == "warn"
    assert result.details == [
        "pid 4242 (user app, application nightly-report, idle in transaction, transaction open 2.0 h)",
        "prepared transaction 'branch-7' (owner xa, prepared 5.0 min ago)",
    ]
    assert "pg_terminate_backend" in result.remedy and "ROLLBACK PREPARED" in result.remedy
    # And with none it passes; a role that cannot see others' sessions is told so
    assert checks.check_open_transactions(facts()).status == "pass"
    blind = checks.check_open_transactions(facts(source=server(role=role(), sees_all_sessions=False)))
    assert "of role app's own sessions only: no pg_read_all_stats" in blind.measured


def test_connection_capacity_fails_on_a_connection_limit_and_warns_on_a_nearly_full_server() -> None:
    # Given 4 copy workers and 8 validation chunks (1 + 8 sessions a side, and the source's walsender)
    mig = role(name="mig", replication=True)
    limited = server(role=mig, connections=ConnectionFacts(role_limit=5, role_used=2))
    given = facts(source=limited, copy_workers=4, validation_sessions=8)
    # When the check runs, Then the role's limit fails it, counting the sessions the role already has
    result = checks.check_connection_capacity(given)
    assert result.status == "fail"
    assert result.details == [
        "source: role mig has CONNECTION LIMIT 5 with 1 session(s) open; the migration opens up to 10"
    ]
    assert "validation.max_parallel_chunks" in result.remedy
    # And a database's limit fails too; a superuser is exempt from both
    db_limited = server(role=mig, connections=ConnectionFacts(database_limit=3))
    assert checks.check_connection_capacity(facts(target=db_limited)).details == [
        "target: database app has CONNECTION LIMIT 3 with 0 session(s) open; the migration opens up to 9"
    ]
    assert (
        checks.check_connection_capacity(facts(source=server(connections=ConnectionFacts(role_limit=1)))).status
        == "pass"
    )
    # And a server with fewer free sessions than needed warns (load varies), superuser slots aside for others
    full = server(role=mig, connections=ConnectionFacts(max_connections=100, reserved=3, used=91))
    tight = checks.check_connection_capacity(facts(target=full, validation_sessions=8))
    assert tight.status == "warn"
    assert tight.details == [
        "target: 7 of max_connections 100 free for role mig (90 in use, 3 kept for superusers); "
        "the migration opens up to 9"
    ]
    assert tight.measured == "source needs up to 9, 100 of 100 free; target needs up to 9, 7 of 100 free"
    # And the subscription copy's table syncs (2 sync workers) count against the source role's limit too
    synced = checks.check_connection_capacity(
        facts(source=limited, copy_method="subscription", copy_workers=4, validation_sessions=2)
    )
    assert synced.details == [
        "source: role mig has CONNECTION LIMIT 5 with 1 session(s) open; the migration opens up to 6"
    ]
    # And fewer validation chunks make it fit
    assert checks.check_connection_capacity(facts(target=full, validation_sessions=4, copy_workers=4)).status == "pass"


def test_foreign_keys_to_tables_not_migrated_fail_when_the_target_lacks_them_and_warn_otherwise() -> None:
    customers, regions = TableName("public", "customers"), TableName("public", "regions")
    lacking = OutsideReference(ORDERS, "orders_customer_id_fkey", customers, "empty")
    filled = OutsideReference(ORDERS, "orders_region_fkey", regions, "has rows")
    # Given a reference to a table empty on the target, When checked, Then it fails naming the constraint
    result = checks.check_references_outside_the_selection(facts(tables=tables(references_outside=[lacking, filled])))
    assert result.status == "fail"
    assert result.details == [
        "public.orders: orders_customer_id_fkey references public.customers, which is not selected and is empty "
        "on the target",
        "public.orders: orders_region_fkey references public.regions, which is not selected and is filled on the "
        "target by something other than this migration",
    ]
    assert "tables.include" in result.remedy
    # And one to a table the target already holds only warns; none passes
    assert (
        checks.check_references_outside_the_selection(facts(tables=tables(references_outside=[filled]))).status
        == "warn"
    )
    assert checks.check_references_outside_the_selection(facts()).status == "pass"


def test_writers_the_fence_cannot_stop_are_named_per_side_and_the_migrations_own_are_not() -> None:
    # Given a source fed by another system's subscription, with a prepared transaction pending, and a
    # target holding the migration's own forward subscription (a re-run preflight)
    given = facts(
        source=server(subscriptions=("crm_feed",), prepared_transactions=2),
        target=server(subscriptions=("zdm_shop",)),
        own_subscriptions=("zdm_shop", "zdm_shop_rev"),
    )
    # When the check runs
    result = checks.check_writers_the_fence_cannot_stop(given)
    # Then it warns about the source's two writers, and not about the migration's own subscription
    assert result.status == "warn"
    assert len(result.details) == 2
    assert result.details[0].startswith("source: subscription(s) crm_feed apply into database 'app'")
    assert "cutover refuses while they are enabled" in result.details[0]
    assert result.details[1].startswith("source: 2 prepared (two-phase) transaction(s)")
    assert "ALTER SUBSCRIPTION <name> DISABLE" in result.remedy
    # And a pair without them passes
    assert checks.check_writers_the_fence_cannot_stop(facts(own_subscriptions=("zdm_shop",))).status == "pass"


def test_an_earlier_executions_replication_fails_the_start_and_says_to_abandon_it_first() -> None:
    # Given the replication a rolled back execution keeps: its slot and publication on the source, its
    # subscription (disabled) on the target
    left = (
        "source: replication slot zdm_shop (keeps WAL until it is dropped)",
        "source: publication zdm_shop",
        "target: subscription zdm_shop (disabled)",
    )
    # When the check runs
    result = checks.check_earlier_attempt(facts(replication_left=left))
    # Then it fails, naming each object, and says what to do: abandon, empty the target, start again
    assert result.status == "fail"
    assert result.details == list(left)
    assert '{"action": "abandon"}' in result.remedy and "empty the target's tables" in result.remedy
    assert "would resume it rather than copy again" in result.remedy
    # And a pair with nothing of it passes
    assert checks.check_earlier_attempt(facts()).status == "pass"


def test_a_fence_left_on_either_database_fails_the_start_naming_the_side_and_how_to_lift_it() -> None:
    # Given a target fenced by a rollback after the cutover, in a database whose name needs quoting
    fenced_target = facts(target=server(fenced=True, database='shop "eu"'))
    # When the check runs
    result = checks.check_read_only_fence(fenced_target)
    # Then it fails for the target, and says how to lift its fence, the name quoted as SQL spells it
    assert result.status == "fail"
    assert len(result.details) == 1 and result.details[0].startswith("target: database 'shop \"eu\"' is read-only")
    assert (
        'SET default_transaction_read_only = off; ALTER DATABASE "shop ""eu""" RESET default_transaction_read_only;'
        in result.remedy
    )
    # And a fenced source is named with what it means (a cutover's fence: the target may be the database)
    source = checks.check_read_only_fence(facts(source=server(fenced=True)))
    assert source.status == "fail" and source.details[0].startswith("source: database 'app' is read-only")
    assert "do not start it again" in source.remedy and "ALTER DATABASE" not in source.remedy
    # And neither fenced passes
    assert checks.check_read_only_fence(facts()).status == "pass"


@pytest.mark.parametrize(
    ("source", "target", "safe"),
    [
        ("integer", "bigint", True),
        ("smallint", "integer", True),
        ("bigint", "integer", False),
        ("integer", "numeric", True),
        ("character varying(20)", "text", True),
        ("character varying(20)", "character varying(40)", True),
        ("character varying(40)", "character varying(20)", False),
        ("character varying(20)", "character varying", True),
        ("character varying", "character varying(20)", False),
        ("numeric(12,2)", "numeric", True),
        ("numeric(12,2)", "numeric(14,2)", True),
        ("numeric(12,2)", "numeric(14,3)", False),
        ("numeric", "numeric(12,2)", False),
        ("real", "double precision", False),
        ("text", "integer", False),
    ],
)
def test_safe_widening(source: str, target: str, safe: bool) -> None:
    assert schema_compare.is_safe_widening(source, target) is safe


def test_schema_differences_are_listed_with_their_weight() -> None:
    source = table(
        columns=(
            Column("id", "bigint", True),
            Column("amount", "numeric(12,2)", True),
            Column("note", "text", False),
            Column("code", "text", True),
            Column("gone", "text", False),
            Column("small", "integer", False),
        )
    )
    target = table(
        columns=(
            Column("id", "bigint", True),
            Column("amount", "text", True),
            Column("note", "text", True),
            Column("code", "text", False),
            Column("small", "bigint", False),
            Column("must", "integer", True),
            Column("defaulted", "integer", True, has_default=True),
            Column("optional", "text", False),
        )
    )
    missing = table(ITEMS, oid=2)
    result = checks.check_target_schema(facts(tables=tables(source, missing, target=[target])))
    assert result.status == "fail"
    assert result.details == [
        "FAIL: public.items: table missing on the target",
        "FAIL: public.orders.amount: type numeric(12,2) on the source, text on the target",
        "FAIL: public.orders.note: NOT NULL on the target but nullable on the source",
        "WARN: public.orders.code: nullable on the target but NOT NULL on the source",
        "FAIL: public.orders.gone: missing on the target (source type text)",
        "WARN: public.orders.small: type integer on the source, bigint on the target (wider)",
        "FAIL: public.orders.must: extra target column, NOT NULL without a default",
        "WARN: public.orders.defaulted: extra target column (integer), not on the source",
        "WARN: public.orders.optional: extra target column (text), not on the source",
    ]
    assert result.measured == "1 of 2 selected tables exist on the target; 5 blocking and 4 other differences"


def test_schema_with_only_harmless_differences_warns() -> None:
    target = table(columns=(*table().columns, Column("extra", "text", False)))
    result = checks.check_target_schema(facts(tables=tables(table(), target=[target])))
    assert result.status == "warn"
    assert "Not blocking" in result.remedy


def test_schema_drift_names_only_what_stops_the_apply_and_leaves_gone_tables_to_the_publication_check() -> None:
    # Given, after the start, a column added on the source only, a column widened on the target only,
    # a table dropped on the target and one dropped on the source
    source = {
        ORDERS: table(columns=(*table().columns, Column("added", "text", False))),
        ITEMS: table(ITEMS, oid=2),
    }
    target = {ORDERS: table(columns=(Column("id", "numeric", True, True), Column("note", "text", False)))}
    gone = TableName("public", "gone")

    # When the status compares them
    found = schema_compare.schema_drift(source, target, [ORDERS, ITEMS, gone])

    # Then only the blocking differences are named (a wider target type carries every value)
    assert found == [
        "public.orders.added: missing on the target (source type text)",
        "public.items: missing on the target",
    ]
    assert schema_compare.drift_problem(found).startswith(
        "the schemas no longer match: public.orders.added: missing on the target (source type text); public.items"
    )


def test_drift_of_the_back_replication_names_each_database_by_what_it_is() -> None:
    # Given the back replication after a cutover (the target publishes, the old source subscribes), and a
    # column the application's next release added on the target only, and a partition made there
    on_target = {ORDERS: table(columns=(*table().columns, Column("gift_note", "text", False)))}
    on_source = {ORDERS: table()}
    sides = schema_compare.REVERSE_SIDES
    # When the drift is named from the back replication's side
    found = schema_compare.schema_drift(on_target, on_source, [ORDERS], sides)
    found += schema_compare.partitions_missing({M: [NOV, DEC]}, {M: [NOV]}, sides)
    # Then "the source" is the old source, where the change is missing, and the fix is worded that way round
    assert found[0] == "public.orders.gift_note: missing on the source (target type text)"
    assert found[1].startswith("public.m_12: a partition of public.m on the target only")
    assert schema_compare.drift_problem(found, sides).endswith(
        "make the same change on the source as on the target (until then the apply stops or rejects rows)"
    )
    # And a key the subscriber lacks is named on its side too
    keyless = schema_compare.compare_table(table(), table(primary_key=()), sides)
    assert keyless == [
        (
            "fail",
            "public.orders: no primary key or replica identity index on the source: the apply of the first UPDATE "
            "or DELETE stops (the target sends only its key, the source cannot find the row)",
        )
    ]


def test_a_drift_problem_names_the_first_differences_and_counts_the_rest() -> None:
    found = [f"public.t{i}: missing on the target" for i in range(schema_compare.DRIFT_SHOWN + 3)]
    problem = schema_compare.drift_problem(found)
    assert f"public.t{schema_compare.DRIFT_SHOWN - 1}: missing on the target; and 3 more." in problem
    assert f"public.t{schema_compare.DRIFT_SHOWN}:" not in problem


M = TableName("public", "m")


def part(name: str, bound: str, parent: TableName = M) -> Partition:
    return Partition(TableName("public", name), parent, bound)


NOV = part("m_11", "FOR VALUES FROM ('2026-11-01') TO ('2026-12-01')")
DEC = part("m_12", "FOR VALUES FROM ('2026-12-01') TO ('2027-01-01')")


def test_a_partition_the_source_added_is_named_only_where_the_target_mirrors_it_without_a_default() -> None:
    # Given next month's partition on the source only
    source = {M: [NOV, DEC]}
    # When the target is partitioned the same way / Then the new partition is named with its statement
    assert schema_compare.partitions_missing(source, {M: [NOV]}) == [
        "public.m_12: a partition of public.m on the source only (a row routed to it stops the apply): "
        "CREATE TABLE public.m_12 PARTITION OF public.m FOR VALUES FROM ('2026-12-01') TO ('2027-01-01')"
    ]
    # When the target has a DEFAULT partition (it takes the rows) / Then nothing is named
    assert schema_compare.partitions_missing(source, {M: [NOV, part("m_other", "DEFAULT")]}) == []
    # When the target partitions its own way (other names) / Then nothing is named: not ours to judge
    assert schema_compare.partitions_missing(source, {M: [part("m_q4", "FOR VALUES FROM (1) TO (2)")]}) == []
    # When the target has no partition at all yet / Then nothing is named (preflight's checks cover it)
    assert schema_compare.partitions_missing(source, {}) == []


def test_a_new_sub_partitioned_month_is_named_at_its_top_only() -> None:
    # Given a new partition that is itself partitioned, with a partition of its own
    dec_a = part("m_12_a", "FOR VALUES IN ('a')", parent=DEC.name)
    found = schema_compare.partitions_missing({M: [NOV, DEC, dec_a]}, {M: [NOV]})
    # Then the month is named (its own partitions follow once it exists)
    assert [f.split(":")[0] for f in found] == ["public.m_12"]


def view(name: str, *, populated: bool = True, owned: bool = True) -> MaterializedView:
    return MaterializedView(TableName.parse(name), populated, owned)


def test_materialized_views_restored_and_owned_on_the_target_pass_counting_those_to_refresh() -> None:
    # Given two selected views on both sides (one the source holds unpopulated), the target's role owning them
    on_source = (view("public.totals"), view("public.drafts", populated=False))
    on_target = (view("public.totals", populated=False), view("public.drafts", populated=False))
    # When checked / Then it passes, saying how many the migration refreshes before reads move
    result = checks.check_materialized_views(
        facts(source=server(materialized_views=on_source), target=server(materialized_views=on_target))
    )
    assert (result.status, result.measured) == (
        "pass",
        "2 selected materialized view(s), 1 to refresh on the target before reads move",
    )


def test_a_view_the_source_holds_unpopulated_needs_no_owner_on_the_target() -> None:
    # Given a view left unpopulated on the source, owned by another role on the target
    on_source = (view("public.drafts", populated=False),)
    on_target = (view("public.drafts", populated=False, owned=False),)
    # When checked / Then it passes: the migration does not refresh it
    result = checks.check_materialized_views(
        facts(source=server(materialized_views=on_source), target=server(materialized_views=on_target))
    )
    assert result.status == "pass"


def test_non_empty_target_tables_fail_with_capped_counts() -> None:
    selection = tables(table(), table(ITEMS, oid=2), target_rows={ORDERS: 3, ITEMS: 1001})
    result = checks.check_target_empty(facts(tables=selection))
    assert result.status == "fail"
    assert result.details == ["public.items: more than 1000 row(s)", "public.orders: 3 row(s)"]
    assert "TRUNCATE public.items, public.orders;" in result.remedy


def test_unreadable_target_tables_are_reported_not_assumed_empty() -> None:
    result = checks.check_target_empty(facts(tables=tables(target_unreadable=[ORDERS])))
    assert result.status == "warn"
    assert result.measured == "0 of 1 target tables hold rows; 1 could not be read"


def test_missing_extensions_fail_and_plpgsql_is_ignored() -> None:
    source = server(extensions={"plpgsql": "1.0", "citext": "1.6", "postgis": "3.4"})
    target = server(extensions={}, available_extensions=frozenset({"citext"}))
    result = checks.check_extensions(facts(source=source, target=target))
    assert result.status == "fail"
    assert result.details == [
        "citext 1.6: available on the target, run CREATE EXTENSION citext;",
        "postgis 3.4: not available on the target server: install its package",
    ]


def test_extension_version_difference_warns() -> None:
    result = checks.check_extensions(
        facts(source=server(extensions={"citext": "1.6"}), target=server(extensions={"citext": "1.5"}))
    )
    assert result.status == "warn"
    assert result.details == ["citext: 1.6 on the source, 1.5 on the target"]


def test_partitioned_root_passes_with_a_note_and_orphan_partition_warns() -> None:
    root = table(TableName("public", "events"), relkind="p", oid=10)
    leaf = table(TableName("public", "events_2024"), oid=11, partition_parent=root.name, is_partition=True)
    with_root = checks.check_partitions(facts(tables=tables(root, leaf)))
    assert with_root.status == "pass"
    assert with_root.details[0].startswith("public.events: partitioned; replicates through its root")
    assert with_root.details[1] == "public.events_2024: partition of public.events, replicates through it"
    alone = checks.check_partitions(facts(tables=tables(leaf)))
    assert alone.status == "warn"
    assert alone.details == ["public.events_2024: partition of public.events, which is not selected"]


def test_plain_inheritance_children_are_tables_of_their_own_and_left_out_ones_warn() -> None:
    # Given a plain (non-partitioned) parent with two inheritance children, one of them selected
    kid_a, kid_b = TableName("public", "ledger_a"), TableName("public", "ledger_b")
    parent = table(TableName("public", "ledger"), oid=20, inheritance_children=(kid_a, kid_b))
    child = table(kid_a, oid=21, partition_parent=parent.name)
    # When the check runs
    result = checks.check_partitions(facts(tables=tables(parent, child)))
    # Then the selected child is a table of its own, and the left-out one is named with its consequence
    assert result.status == "warn"
    assert result.details == [
        "public.ledger_a: inherits from public.ledger (plain inheritance): replicates as a table of its own",
        "public.ledger: its inheritance children public.ledger_b are not selected: their rows (which "
        "`SELECT FROM public.ledger` also shows) are not migrated",
    ]
    assert "public.ledger_b" in result.remedy
    # And with both children selected it passes
    other = table(kid_b, oid=22, partition_parent=parent.name)
    assert checks.check_partitions(facts(tables=tables(parent, child, other))).status == "pass"


@pytest.mark.parametrize(
    ("copy_gb", "limit", "method", "status"),
    [
        (10, None, "parallel-snapshot", "pass"),  # local: nothing limits the copy
        (10, 840.0, "parallel-snapshot", "pass"),  # 10 GB at 50 MB/s: 205 s
        (30, 840.0, "parallel-snapshot", "warn"),  # 614 s: over half the function's time
        (50, 840.0, "parallel-snapshot", "fail"),  # 1024 s: the function would be stopped mid-copy
        (50, 840.0, "subscription", "pass"),  # the target server copies: no function limit
    ],
)
def test_a_parallel_copy_longer_than_the_replication_function_fails(
    copy_gb: int, limit: float | None, method: str, status: str
) -> None:
    given = facts(tables=tables(copy_bytes=copy_gb * GB), copy_time_limit_seconds=limit, copy_method=method)
    result = checks.check_copy_fits_the_function(given)
    assert result.status == status
    if status != "pass":
        assert "copy_method: subscription" in result.remedy


def test_engine_dms_warns_that_its_cutover_pauses_writes_while_the_task_stops() -> None:
    # Given engine dms, whose cutover waits for a marker row and then for the task to stop
    result = checks.check_cutover_engine(facts(engine="dms"))
    # Then preflight lets it through but says the write pause includes stopping the task
    assert result.status == "warn"
    assert "marker row" in result.measured and "180 s" in result.measured
    assert "engine logical" in result.remedy
    assert checks.check_cutover_engine(facts(engine="debezium")).status == "pass"
    assert checks.check_cutover_engine(facts()).status == "pass"


def test_sequence_owned_by_no_column_warns() -> None:
    uses = [
        SequenceUse(TableName("public", "orders_id_seq"), ORDERS, "id", owned=True),
        SequenceUse(TableName("public", "invoice_no"), ORDERS, "invoice", owned=False),
    ]
    result = checks.check_sequences(facts(tables=tables(sequences=uses)))
    assert result.status == "warn"
    assert result.details == ["public.invoice_no: used in the default of public.orders.invoice, owned by no column"]
    assert result.measured == "2 sequence(s) used by selected tables, 1 owned by no column"


@pytest.mark.parametrize("type_name", ["oid", "lo", "public.lo"])
def test_large_object_columns_fail(type_name: str) -> None:
    info = table(columns=(Column("id", "bigint", True), Column("doc", type_name, False)))
    result = checks.check_large_objects(facts(tables=tables(info)))
    assert result.status == "fail"
    assert result.details == [f"public.orders.doc ({type_name})"]


def test_large_objects_without_columns_warn_and_unknown_warns() -> None:
    assert checks.check_large_objects(facts(source=server(large_objects=5))).status == "warn"
    unknown = checks.check_large_objects(facts(source=server(large_objects=None)))
    assert unknown.status == "warn"
    assert "pg_largeobject_metadata" in unknown.remedy


# --- WAL retention -----------------------------------------------------------------------------


def retention(
    rate: float, copy_bytes: int, *, limit: int | None, free: int | None, mb_per_s: float = 10
) -> CheckResult:
    return checks.check_wal_retention(
        facts(
            tables=tables(copy_bytes=copy_bytes),
            wal=wal(rate),
            source=server(max_slot_wal_keep_size=limit),
            free_disk_bytes=free,
            expected_copy_mb_per_s=mb_per_s,
        )
    )


def test_wal_limit_smaller_than_expected_retention_fails() -> None:
    # 1 GB at 10 MB/s = 102.4 s; 1 MB/s of WAL -> 102.4 MB retained > 64 MB allowed
    result = retention(MB, GB, limit=64 * MB, free=None)
    assert result.status == "fail"
    assert "max_slot_wal_keep_size=64.0 MB" in result.measured
    assert "~102.4 MB retained" in result.measured
    assert "ALTER SYSTEM SET max_slot_wal_keep_size = '205MB'" in result.remedy
    assert "expected_copy_mb_per_s" in result.remedy


def test_wal_limit_with_little_headroom_warns_and_ample_passes() -> None:
    assert retention(MB, GB, limit=150 * MB, free=None).status == "warn"
    assert retention(MB, GB, limit=1024 * MB, free=None).status == "pass"


def test_rds_wal_limit_remedy_uses_the_parameter_group() -> None:
    result = checks.check_wal_retention(
        facts(tables=tables(copy_bytes=GB), wal=wal(MB), source=server(max_slot_wal_keep_size=MB, is_rds=True))
    )
    assert result.status == "fail"
    assert "DB parameter group" in result.remedy and "ALTER SYSTEM" not in result.remedy


def test_unlimited_retention_is_compared_with_free_disk() -> None:
    assert retention(MB, GB, limit=None, free=50 * MB).status == "fail"
    assert retention(MB, GB, limit=None, free=150 * MB).status == "warn"
    assert retention(MB, GB, limit=None, free=10 * GB).status == "pass"


def test_unlimited_retention_with_unknown_disk_warns_what_to_check() -> None:
    result = retention(MB, GB, limit=None, free=None)
    assert result.status == "warn"
    assert "could not be measured" in result.remedy
    assert "FreeStorageSpace" in result.remedy
    assert "free disk unknown" in result.measured


def test_quiet_source_passes() -> None:
    assert retention(0, 100 * GB, limit=MB, free=None).status == "pass"


def test_wal_sample_rate() -> None:
    assert WalSample(Lsn(100), Lsn(300), 2.0).bytes_per_second == 100
    assert WalSample(Lsn(100), Lsn(300), 0).bytes_per_second == 0
    assert WalSample(Lsn(300), Lsn(100), 1.0).bytes_per_second == 0


def test_byte_and_time_formatting() -> None:
    assert checks.fmt_bytes(512) == "512 B"
    assert checks.fmt_bytes(1536) == "1.5 kB"
    assert checks.fmt_bytes(3 * GB) == "3.0 GB"
    assert checks.fmt_seconds(30) == "30.0 s"
    assert checks.fmt_seconds(600) == "10.0 min"
    assert checks.fmt_seconds(3 * 3600) == "3.0 h"


def test_the_debezium_applier_needs_a_target_role_that_may_set_session_replication_role() -> None:
    # Given PostgreSQL 16, and a target role in pg_create_subscription that may not set session_replication_role
    pg16 = ServerVersion(160002, "16.2")
    refused = role(member_of=frozenset({"pg_create_subscription"}), can_set_replication_role=False)
    # When the engine is debezium, whose applier writes as session_replication_role = replica
    result = checks.check_target_role(facts(engine="debezium", target=server(version=pg16, role=refused)))
    # Then it fails, naming the grant that lets the role set it
    assert result.status == "fail"
    assert "GRANT SET ON PARAMETER session_replication_role TO app;" in result.remedy
    assert result.details == ["role app cannot set session_replication_role"]
    # And once the role may set it (granted, or rds_superuser), it passes
    granted = replace(refused, can_set_replication_role=True)
    assert (
        checks.check_target_role(facts(engine="debezium", target=server(version=pg16, role=granted))).status == "pass"
    )
    rds = server(is_rds=True, role=role(member_of=frozenset({"rds_superuser"})))
    assert checks.check_target_role(facts(engine="debezium", target=rds)).status == "pass"
    # And before PostgreSQL 15 (no GRANT SET ON PARAMETER) only a superuser will do
    pg14 = server(version=ServerVersion(140010, "14.10"), role=replace(refused, member_of=frozenset()))
    old = checks.check_target_role(facts(engine="debezium", target=pg14))
    assert old.status == "fail" and "GRANT SET ON PARAMETER" not in old.remedy and "superuser" in old.remedy


@pytest.mark.parametrize(("copy_method", "status"), [("parallel-snapshot", "fail"), ("subscription", "pass")])
def test_the_parallel_copy_needs_a_target_role_that_may_set_session_replication_role(
    copy_method: str, status: str
) -> None:
    # Given a PostgreSQL 16 target role that may create subscriptions but not set session_replication_role
    pg16 = ServerVersion(160002, "16.2")
    refused = role(member_of=frozenset({"pg_create_subscription"}), can_set_replication_role=False)
    # When the logical engine copies with `copy_method`
    result = checks.check_target_role(facts(target=server(version=pg16, role=refused), copy_method=copy_method))
    # Then the parallel copy (whose sessions write as replica) fails with the grant; the subscription's own copy does not
    assert result.status == status
    if status == "fail":
        assert "GRANT SET ON PARAMETER session_replication_role TO app;" in result.remedy


def test_a_role_that_may_not_read_origin_progress_is_warned_on_each_subscribing_side() -> None:
    # Given a target role and a source role that may not execute pg_replication_origin_progress
    unreadable = role(can_read_origin_progress=False)
    target = server(role=replace(unreadable, name="migrator"))
    source = server(role=replace(unreadable, name="owner"))
    # When checked for the logical engine (the target subscribes forward, the source back)
    result = checks.check_apply_position_rights(facts(source=source, target=target))
    # Then it warns for both, naming the grant
    assert result.status == "warn"
    assert [d.split(" may not")[0] for d in result.details] == ["target role migrator", "source role owner"]
    assert "GRANT EXECUTE ON FUNCTION pg_replication_origin_progress(text, boolean) TO migrator;" in result.remedy
    # And for an engine without a forward subscription only the source is looked at
    dms = checks.check_apply_position_rights(facts(source=source, target=target, engine="dms"))
    assert [d.split(" may not")[0] for d in dms.details] == ["source role owner"]
    # And roles that may read it pass
    assert checks.check_apply_position_rights(facts()).status == "pass"


def test_debezium_engine_refuses_tables_without_a_primary_key() -> None:
    # Given a table replicated with REPLICA IDENTITY FULL and no primary key
    keyless = table(primary_key=(), replica_identity="f")
    # When the engine is logical it is a warning; when it is debezium it fails (changes apply by key)
    assert checks.check_replica_identity(facts(tables=tables(keyless))).status == "warn"
    result = checks.check_replica_identity(facts(engine="debezium", tables=tables(keyless)))
    assert result.status == "fail"
    assert "primary key" in result.remedy and "public.orders" in result.details[0]


def test_debezium_engine_refuses_arrays_it_would_send_as_null_unless_replica_identity_full() -> None:
    # Given a table with a timestamp[] column (Debezium sends NULL when such a TOASTed array is unchanged)
    columns = (Column("id", "bigint", True), Column("seen", "timestamp without time zone[]", False))
    risky = table(columns=columns)
    # When the engine is debezium it fails, naming the column; logical does not care
    result = checks.check_change_stream_types(facts(engine="debezium", tables=tables(risky)))
    assert result.status == "fail"
    assert result.details == ["public.orders.seen (timestamp without time zone[])"]
    assert checks.check_change_stream_types(facts(tables=tables(risky))).status == "pass"
    # And with REPLICA IDENTITY FULL (the whole old row in the WAL) it no longer fails (it warns about the
    # array's elements before 1582, see below)
    full = table(columns=columns, replica_identity="f")
    assert checks.check_change_stream_types(facts(engine="debezium", tables=tables(full))).status == "warn"
    # And text[] arrays, which Debezium marks, do not fail (they warn only of the shapes it cannot send, see below)
    marked = table(columns=(Column("id", "bigint", True), Column("tags", "text[]", False)))
    result = checks.check_change_stream_types(facts(engine="debezium", tables=tables(marked)))
    assert (result.status, result.details) == ("warn", ["public.orders.tags"])


def stream_types(*columns: tuple[str, str], engine: str = "debezium") -> CheckResult:
    """The change-stream types check of one table (REPLICA IDENTITY FULL) with a bigint key and these columns."""
    cols = (Column("id", "bigint", True), *(Column(name, type_name, False) for name, type_name in columns))
    return checks.check_change_stream_types(
        facts(engine=engine, tables=tables(table(columns=cols, replica_identity="f")))
    )


def test_debezium_engine_refuses_time_with_time_zone_columns_it_would_convert_to_utc() -> None:
    # Given a table with timetz columns (Debezium sends them converted to UTC: the offset is lost)
    columns = [("opens", "time with time zone"), ("slots", "time(3) with time zone[]"), ("seen", "timestamptz")]
    # When the engine is debezium it fails, naming both columns (timestamptz arrives exactly) and what to do
    result = stream_types(*columns)
    assert result.status == "fail"
    assert [d.split(": ")[0] for d in result.details] == [
        "public.orders.opens (time with time zone)",
        "public.orders.slots (time(3) with time zone[])",
    ]
    assert all("converted to UTC" in d for d in result.details) and "engine 'logical'" in result.remedy
    # And the logical engine, which copies the values themselves, does not care
    assert stream_types(*columns, engine="logical").status == "pass"


def test_debezium_engine_warns_about_arrays_of_dates_and_timestamps_and_numeric() -> None:
    # Given arrays Debezium handles through java.sql types (dates before 1582 and BC eras are lost) and numeric[]
    columns = [("days", "date[]"), ("stamps", "timestamp(3) with time zone[]"), ("amounts", "numeric(10,2)[]")]
    # When the engine is debezium it warns, naming each column and what to do
    result = stream_types(*columns, ("names", "text[]"))
    assert result.status == "warn"
    assert sorted(result.details) == [f"public.orders.{c}" for c in ("amounts", "days", "names", "stamps")]
    assert "1582-10-15" in result.remedy and "NaN" in result.remedy and "engine 'logical'" in result.remedy


@pytest.mark.parametrize(
    ("type_name", "says"),
    [
        ("box", "left out"),
        ("polygon", "left out"),
        ("tsquery", "left out"),
        ("int4multirange", "left out"),
        ("interval(3)[]", "left out"),
        ("bit varying(20)", "leading zeros"),
        ("bit varying[]", "leading zeros"),
        ("time(3) without time zone[]", "microseconds"),
        ("bit(4)[]", "sent as NULL"),
        ("time with time zone", "converted to UTC"),
    ],
)
def test_debezium_engine_refuses_types_it_leaves_out_or_cannot_carry(type_name: str, says: str) -> None:
    # Given a column of a type Debezium leaves out of its events or sends without part of its value
    # When the engine is debezium it fails, naming the column, its type and what is lost
    result = stream_types(("odd", type_name))
    assert result.status == "fail"
    assert len(result.details) == 1 and result.details[0].startswith(f"public.orders.odd ({type_name}): ")
    assert says in result.details[0] and "engine 'logical'" in result.remedy
    # And the logical engine copies them as they are
    assert stream_types(("odd", type_name), engine="logical").status == "pass"


def test_debezium_engine_takes_the_types_it_carries_exactly() -> None:
    # Given types verified end to end through the real connector (tests/integration/test_debezium_stream.py)
    names = ["bit(8)", "bit(1)", "point", "inet", "cidr", "macaddr", "int4range", "tstzrange", "citext", "ltree"]
    names += ["xml", "tsvector", "money", "oid", "character(5)", "time(6) without time zone"]
    # Then nothing fails or warns
    assert stream_types(*((f"c{i}", n) for i, n in enumerate(names))).status == "pass"
    # And arrays of them only warn of the shapes Debezium cannot send (below)
    result = stream_types(("ips", "inet[]"), ("ratios", "real[]"))
    assert (result.status, result.details) == ("warn", ["public.orders.ips", "public.orders.ratios"])


def test_debezium_engine_refuses_arrays_of_shapes_it_sends_wrongly_and_warns_of_any_array_column() -> None:
    # Given array columns, one of them holding 2-D values on the source (found by preflight's scan)
    cols = (Column("id", "bigint", True), Column("grid", "integer[]", False), Column("tags", "text[]", False))
    info = table(columns=cols, replica_identity="f")
    found = tables(info, sent_wrongly=SentWrongly(["public.orders.grid (integer[]): 3 value(s)"], [], []))
    # When the engine is debezium it fails, naming the column and what arrives instead, and what to do
    result = checks.check_change_stream_types(facts(engine="debezium", tables=found))
    assert result.status == "fail"
    assert result.details == ["public.orders.grid (integer[]): 3 value(s)"]
    assert "'{{1,2},{3,4}}' arrives as '{NULL,NULL}'" in result.remedy and "engine 'logical'" in result.remedy
    assert "1 holding values it would send wrongly" in result.measured
    # And with none on the source now it warns for every array column, giving the CHECK that keeps them out
    clean = checks.check_change_stream_types(facts(engine="debezium", tables=tables(info)))
    assert (clean.status, clean.details) == ("warn", ["public.orders.grid", "public.orders.tags"])
    assert "CHECK (array_ndims(<column>) = 1 AND array_lower(<column>, 1) = 1) NOT VALID" in clean.remedy
    # And a table whose scan did not finish in time is named as such
    late = checks.check_change_stream_types(
        facts(engine="debezium", tables=tables(info, sent_wrongly=SentWrongly([], [], [ORDERS])))
    )
    assert late.status == "warn" and late.details[0] == "public.orders" and "not scanned in time" in late.remedy
    # And dates BC (its snapshot sends them as AD) fail, naming the column
    bc = tables(table(), sent_wrongly=SentWrongly([], ["public.orders.born (date): 2 value(s)"], []))
    dated = checks.check_change_stream_types(facts(engine="debezium", tables=bc))
    assert (dated.status, dated.details) == ("fail", ["public.orders.born (date): 2 value(s)"])
    assert "'0044-03-15 BC' arrives as '0044-03-15'" in dated.remedy
    # And the other engines carry arrays as they are
    assert checks.check_change_stream_types(facts(tables=found)).status == "pass"


def test_debezium_engine_refuses_composite_columns_the_catalog_names() -> None:
    # Given a column of a composite type (the catalog's typtype 'c': the type's name tells nothing)
    cols = (Column("id", "bigint", True), Column("pr", "pair", False, composite=True), Column("m", "mood", False))
    result = checks.check_change_stream_types(
        facts(engine="debezium", tables=tables(table(columns=cols, replica_identity="f")))
    )
    # Then it fails as a type Debezium leaves out; the enum beside it does not
    assert result.status == "fail"
    assert result.details == ["public.orders.pr (pair): left out of Debezium's events (a type it does not know)"]


# --- the subscription's password in statement logs ---------------------------------------------


def logging(*settings: tuple[str, str, bool]) -> tuple[LogSetting, ...]:
    return tuple(LogSetting(name, value, can_set) for name, value, can_set in settings)


def test_settings_the_role_can_switch_off_or_that_keep_nothing_pass() -> None:
    # Given a role that may change every setting, and one that may change none while none keeps statements
    switchable = logging(("log_min_error_statement", "error", True), ("log_statement", "ddl", True))
    quiet = logging(
        ("log_min_error_statement", "panic", False),
        ("log_statement", "none", False),
        ("log_min_duration_statement", "-1", False),
        ("log_transaction_sample_rate", "0", False),
        ("pg_stat_statements.track_utility", "off", False),
    )
    for settings in (switchable, quiet):
        result = checks.check_subscription_password_logging(
            facts(source=server(statement_logging=settings), target=server(statement_logging=settings))
        )
        # Then the check passes
        assert result.status == "pass", result


def test_a_role_that_cannot_switch_off_statement_logging_is_warned_on_each_subscribing_side() -> None:
    # Given a target role that may not change log_statement = ddl nor pg_stat_statements' utility tracking,
    # and a source role that may not change the default log_min_error_statement = error
    target = server(
        role=role(name="migrator"),
        statement_logging=logging(
            ("log_statement", "ddl", False),
            ("pg_stat_statements.track_utility", "on", False),
            ("log_min_duration_statement", "-1", False),
        ),
    )
    source = server(role=role(name="owner"), statement_logging=logging(("log_min_error_statement", "error", False)))
    # When checked for the logical engine (the target subscribes forward, the source back)
    result = checks.check_subscription_password_logging(facts(source=source, target=target))
    # Then it warns, naming each side, setting and role, and how to grant the right
    assert result.status == "warn"
    assert [d.split(" and role")[0] for d in result.details] == [
        "target: log_statement = ddl",
        "target: pg_stat_statements.track_utility = on",
        "source: log_min_error_statement = error",
    ]
    assert "GRANT SET ON PARAMETER log_statement, pg_stat_statements.track_utility TO migrator;" in result.remedy
    # And for an engine without a forward subscription only the source's is reported
    dms = checks.check_subscription_password_logging(facts(source=source, target=target, engine="dms"))
    assert [d.split(":")[0] for d in dms.details] == ["source"]


@pytest.mark.parametrize(
    ("value", "logs_ddl"),
    [
        ("ddl", True),
        ("DDL", True),
        ("all", True),
        ("write, ddl", True),
        ("all, -misc", True),
        ("-ddl, ddl", True),
        ("all, -ddl", False),
        ("ddl,-all", False),
        ("ddl, none", True),  # NONE adds no class; it takes none away
        ("read, write, role, misc", False),
        ("none", False),
        ("", False),
    ],
)
def test_pgaudit_log_keeps_create_subscription_when_its_classes_hold_ddl(value: str, logs_ddl: bool) -> None:
    # Given pgaudit.log set to a list of classes, read left to right as pgaudit reads it
    # Then it keeps CREATE SUBSCRIPTION's text (a DDL statement) exactly when DDL is among them
    assert LogSetting("pgaudit.log", value, False).keeps_statements is logs_ddl


def test_pgaudit_the_role_may_not_switch_off_is_warned_with_the_grant_and_the_alter_role_rds_documents() -> None:
    # Given a target role that may not change pgaudit.log = 'ddl' (a superuser-only setting)
    target = server(role=role(name="migrator"), statement_logging=logging(("pgaudit.log", "ddl", False)))
    # When checked
    result = checks.check_subscription_password_logging(facts(target=target))
    # Then it warns for pgaudit.log, and names both remedies
    assert result.status == "warn"
    assert [d.split(" and role")[0] for d in result.details] == ["target: pgaudit.log = ddl"]
    assert "GRANT SET ON PARAMETER pgaudit.log TO migrator;" in result.remedy
    assert "ALTER ROLE migrator SET pgaudit.log = 'none';" in result.remedy


def test_which_values_keep_a_statements_text() -> None:
    assert LogSetting("log_min_error_statement", "warning", False).keeps_statements
    assert not LogSetting("log_min_error_statement", "fatal", False).keeps_statements
    assert LogSetting("log_min_duration_statement", "0", False).keeps_statements
    assert LogSetting("log_transaction_sample_rate", "0.01", False).keeps_statements
    assert not LogSetting("log_statement", "mod", False).keeps_statements
