"""Row-level security against real PostgreSQL: policies filter a role's reads silently, so nothing may
copy or compare through them. Each part refuses, by name, instead of losing or skipping the hidden rows."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from lambdas.core.catalog import describe_tables
from lambdas.core.changestream.runtime import PartState
from lambdas.core.config import LogicalSettings, Validation
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.engines.base import Phase
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames, ReplicationSetupError
from lambdas.core.engines.snapshot_copy import CopyChunk, CopyFailed, CopySessionFactory, copy_in_parallel
from lambdas.core.ranges import WHOLE_TABLE
from lambdas.core.tables import TableName
from lambdas.core.validation import SessionPair, compare_chunk, plan_validation, validate
from rehearsal.broker import Broker
from rehearsal.changestream import LocalChangeStream
from rehearsal.compare import compare_databases
from rehearsal.servers import PostgresServer
from tests.integration.db_env import query, run_sql
from tests.integration.stream_env import make_engine, running, wait_until
from tests.integration.test_preflight import dbname, migration_for, preflight

T = TableName("public", "t")
_roles = itertools.count(1)

# Rows 1..20: even ones belong to tenant a, odd ones to tenant b. The policy shows tenant a's only.
SCHEMA = "CREATE TABLE t (id int PRIMARY KEY, tenant text NOT NULL, v text)"
ROWS = "INSERT INTO t SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, 'v' || g FROM generate_series(1, 20) g"
POLICY = "ALTER TABLE t ENABLE ROW LEVEL SECURITY; CREATE POLICY tenant_a ON t USING (tenant = 'a')"


@dataclass
class RlsPair:
    """A new database on each server, as the superuser, and a role owning table t on both."""

    servers: tuple[PostgresServer, PostgresServer]
    source_dsn: str
    target_dsn: str
    role: str

    def as_role(self, side: str) -> str:
        server, dsn = (self.servers[0], self.source_dsn) if side == "source" else (self.servers[1], self.target_dsn)
        return server.dsn(dbname(dsn), user=self.role)

    def force_policy(self, *sides: str) -> None:
        """The tenant policy on t, forced on its owner too (as multi-tenant applications that connect as the
        owner do): the role then reads tenant a's rows only."""
        for side in sides:
            run_sql(
                self.source_dsn if side == "source" else self.target_dsn,
                f"{POLICY}; ALTER TABLE t FORCE ROW LEVEL SECURITY",
            )


@pytest.fixture
def rls(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[RlsPair]:
    source_dsn, target_dsn = fresh_dbs
    role = f"zdm_rls_{next(_roles)}"
    for server, dsn in zip(pg_pair, fresh_dbs, strict=True):
        server.psql(f"CREATE ROLE {role} LOGIN REPLICATION NOSUPERUSER")
        run_sql(dsn, f'{SCHEMA}; ALTER TABLE t OWNER TO {role}; GRANT CREATE ON DATABASE "{dbname(dsn)}" TO {role}')
    try:
        yield RlsPair(pg_pair, source_dsn, target_dsn, role)
    finally:
        for server, dsn in zip(pg_pair, fresh_dbs, strict=True):
            server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            run_sql(dsn, f"DROP OWNED BY {role}")
            server.psql(f"DROP ROLE IF EXISTS {role}")


def given_rows_only_tenant_a_has_on_the_target(rls: RlsPair) -> None:
    run_sql(rls.source_dsn, ROWS)
    run_sql(rls.target_dsn, f"{ROWS}; DELETE FROM t WHERE tenant = 'b'")


# --- the catalog ---------------------------------------------------------------------------------


def test_the_catalog_says_when_policies_filter_the_roles_reads(rls: RlsPair) -> None:
    # Given table t with a tenant policy, not forced: its owner bypasses it
    run_sql(rls.source_dsn, POLICY)
    conn = connect(rls.as_role("source"))
    try:
        assert not describe_tables(conn, [T])[T].row_security_active
        # When the policy is forced on the owner too
        run_sql(rls.source_dsn, "ALTER TABLE t FORCE ROW LEVEL SECURITY")
        # Then the catalog says the role's reads are filtered; a superuser's never are
        assert describe_tables(conn, [T])[T].row_security_active
    finally:
        conn.close()
    superuser = connect(rls.source_dsn)
    try:
        assert not describe_tables(superuser, [T])[T].row_security_active
    finally:
        superuser.close()


# --- preflight -----------------------------------------------------------------------------------


def test_preflight_fails_while_policies_hide_rows_and_passes_with_bypassrls(rls: RlsPair) -> None:
    # Given the policy forced on both sides, and the migration connecting as the tables' owner
    run_sql(rls.source_dsn, ROWS)
    rls.force_policy("source", "target")
    source, target = connect(rls.as_role("source")), connect(rls.as_role("target"))
    try:
        # When the preflight runs
        check = preflight(source, target, migration_for(rls.source_dsn, rls.target_dsn)).get("row_level_security")

        # Then it fails, naming each side, the role and the table, and says how to let the role read every row
        assert check.status == "fail"
        assert check.measured == "tables whose policies hide rows from the migration's role: source 1, target 1"
        assert check.details == [
            f"source: row-level security policies filter what role {rls.role} reads from public.t "
            "(the copy and the validation would silently see only those rows)",
            f"target: row-level security policies filter what role {rls.role} reads from public.t "
            "(the validation would silently see only those rows)",
        ]
        assert f"ALTER ROLE {rls.role} BYPASSRLS;" in check.remedy

        # And once the role has BYPASSRLS (what the remedy says), it passes
        rls.servers[0].psql(f"ALTER ROLE {rls.role} BYPASSRLS")
        rls.servers[1].psql(f"ALTER ROLE {rls.role} BYPASSRLS")
        for conn in (source, target):  # the attribute is read at login
            conn.close()
        source, target = connect(rls.as_role("source")), connect(rls.as_role("target"))
        again = preflight(source, target, migration_for(rls.source_dsn, rls.target_dsn)).get("row_level_security")
        assert again.status == "pass", again
    finally:
        source.close()
        target.close()


# --- the engines' copy ---------------------------------------------------------------------------


@pytest.mark.parametrize("copy_method", ["parallel-snapshot", "subscription"])
def test_the_engine_refuses_to_copy_rows_policies_hide_and_creates_nothing(rls: RlsPair, copy_method: str) -> None:
    # Given 20 rows on the source, 10 of which the forced policy hides from the migration's role
    # (before this check, both copy methods silently copied 10 rows and went on streaming)
    run_sql(rls.source_dsn, ROWS)
    rls.force_policy("source")
    plan = LogicalReplicationPlan(ReplicationNames("zdm_rls"), (T,), LogicalSettings(copy_method=copy_method))
    engine = LogicalEngine(rls.as_role("source"), rls.target_dsn, plan)

    # When the engine starts, Then it refuses by name before creating anything on either side
    with pytest.raises(ReplicationSetupError, match=r"row-level security policies hide rows of public\.t"):
        engine.start()
    assert query(rls.source_dsn, "SELECT count(*) FROM pg_publication")[0][0] == 0
    assert query(rls.source_dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'zdm_rls'")[0][0] == 0
    assert query(rls.target_dsn, "SELECT count(*) FROM pg_subscription")[0][0] == 0
    assert query(rls.target_dsn, "SELECT count(*) FROM t")[0][0] == 0

    # And with the policy no longer forced on the owner, the same start copies all 20 rows
    run_sql(rls.source_dsn, "ALTER TABLE t NO FORCE ROW LEVEL SECURITY")
    try:
        engine.start()
        assert _wait_rows(rls.target_dsn, 20) == 20
    finally:
        engine.teardown()


def _wait_rows(dsn: str, rows: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        count = int(query(dsn, "SELECT count(*) FROM t")[0][0])
        if count >= rows:
            break
        time.sleep(0.1)
    return count


def test_a_policy_made_after_the_check_fails_the_parallel_copy_instead_of_thinning_it(rls: RlsPair) -> None:
    # Given the forced policy, and copy sessions of the migration's role (as if it appeared after start's check)
    run_sql(rls.source_dsn, ROWS)
    rls.force_policy("source")
    exporter = connect(rls.as_role("source"), autocommit=False)
    try:
        execute(exporter, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        snapshot = str(fetch_value(exporter, "SELECT pg_export_snapshot()"))
        info = describe_tables(exporter, [T])[T]
        sessions = CopySessionFactory(lambda: connect(rls.as_role("source")), lambda: connect(rls.target_dsn))

        # When the copy runs, Then it fails naming row-level security, and nothing lands on the target
        with pytest.raises(CopyFailed, match="row-level security"):
            copy_in_parallel([CopyChunk(info, 0, WHOLE_TABLE, 1)], snapshot, sessions, workers=1, reconnect_seconds=1)
    finally:
        exporter.close()
    assert query(rls.target_dsn, "SELECT count(*) FROM t")[0][0] == 0


# --- validation ----------------------------------------------------------------------------------


def test_validation_reports_a_table_policies_hide_rows_of_instead_of_calling_it_equal(rls: RlsPair) -> None:
    # Given 10 rows missing on the target, all of them rows the forced policy hides from the role on both sides
    # (before this check the validator, as that role, said EQUAL: 10 rows against 10)
    given_rows_only_tenant_a_has_on_the_target(rls)
    rls.force_policy("source", "target")

    # When the validator runs as that role
    summary = validate(rls.as_role("source"), rls.as_role("target"), [T], Validation(), workers=1)

    # Then the table is a problem that fails the validation, naming row-level security; no row is called equal
    assert not summary.ok
    (table,) = summary.per_table
    assert (
        table.problems
        and "row-level security policies hide rows from this role on the source and the target" in (table.problems[0])
    )
    assert not table.compared and table.source_rows == 0 and table.target_rows == 0

    # And with the policy no longer forced, the 10 missing rows are found
    run_sql(rls.source_dsn, "ALTER TABLE t NO FORCE ROW LEVEL SECURITY")
    run_sql(rls.target_dsn, "ALTER TABLE t NO FORCE ROW LEVEL SECURITY")
    summary = validate(rls.as_role("source"), rls.as_role("target"), [T], Validation(), workers=1)
    assert summary.per_table[0].missing.count == 10


def test_a_policy_made_after_planning_fails_the_chunk_instead_of_hiding_rows(rls: RlsPair) -> None:
    # Given a plan made while the role could read every row
    given_rows_only_tenant_a_has_on_the_target(rls)
    with SessionPair.open(rls.as_role("source"), rls.as_role("target")) as pair:
        plan = plan_validation(pair, [T], Validation())
    # When the forced policy appears before the chunk runs
    rls.force_policy("source", "target")

    # Then the chunk fails, naming row-level security, instead of comparing tenant a's rows alone
    with (
        SessionPair.open(rls.as_role("source"), rls.as_role("target")) as pair,
        pytest.raises(psycopg2.errors.InsufficientPrivilege, match="row-level security"),
    ):
        compare_chunk(pair, plan.chunks[0])


def test_the_rehearsal_compare_fails_on_rows_policies_hide(rls: RlsPair) -> None:
    # Given the forced policy, When the rehearsal's row-for-row compare reads as the role, Then it fails
    given_rows_only_tenant_a_has_on_the_target(rls)
    rls.force_policy("source", "target")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="row-level security"):
        compare_databases(rls.as_role("source"), rls.as_role("target"), [T])


# --- the Debezium engine -------------------------------------------------------------------------


def test_debezium_refuses_and_its_snapshot_fails_rather_than_skip_rows_policies_hide(
    rls: RlsPair, broker: Broker, tmp_path: Path
) -> None:
    # Given 20 rows on the source, 10 of which the forced policy hides from the connector's role, and a
    # connector that retries a failure once (debezium.max_retries) before it fails
    run_sql(rls.source_dsn, ROWS)
    rls.force_policy("source")
    engine = make_engine(rls.as_role("source"), rls.target_dsn, broker, tmp_path, [T], name="dbz-rls", max_retries=1)
    with running(engine):
        # When the engine starts, Then it refuses by name before the connector runs
        with pytest.raises(ReplicationSetupError, match=r"row-level security policies hide rows of public\.t"):
            engine.start()
        assert engine.runtime.health().connector is PartState.ABSENT

        # And a connector that snapshots anyway (as if the policy came after the check) fails on the
        # policy, and sends none of the 10 rows it may see: its sessions run with row_security off
        # (database.initial.statements). After its retry it stops, and the engine reports it failed
        # (with Debezium's default of endless retries it would look like a copy that never ends).
        runtime = engine.runtime
        assert isinstance(runtime, LocalChangeStream)
        log = runtime.workdir / "connector" / "process.log"
        run_sql(rls.as_role("source"), f"CREATE PUBLICATION {engine.plan.publication} FOR TABLE t")  # as a start would
        runtime.start(engine.plan.connector, engine.plan.table_topics)
        wait_until(lambda: engine.runtime.health().connector is PartState.FAILED, 120, "the connector to fail", engine)
        assert "query would be affected by row-level security policy" in log.read_text(errors="replace")
        assert sum(engine.kafka.end_offsets(engine.plan.table_topics).values()) == 0
        assert engine.status().phase is Phase.FAILED
