"""Preflight against real PostgreSQL servers: a good pair passes, and each bad setup is caught with its fix."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from lambdas.core.catalog import describe_tables
from lambdas.core.config import LogicalSettings, Migration, parse_migration
from lambdas.core.db import Connection, connect, execute, fetch_value
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.fence import FenceError, take_fence
from lambdas.core.preflight import LocalDiskProbe, PreflightReport, format_report, run_preflight
from lambdas.core.preflight.facts import SentWrongly, values_sent_wrongly
from lambdas.core.sequences import SequenceSyncError, sync_sequences
from lambdas.core.tables import TableName
from rehearsal.sample import create_schema, load_data
from rehearsal.servers import PostgresServer, start_server
from tests.conftest import server_pair
from tests.integration.db_env import run_sql
from tests.integration.standby_env import standby_of
from tests.integration.test_fence import DnsLikeRouter

WAL_SAMPLE_SECONDS = 0.2
_role_counter = itertools.count(1)


def migration_for(source_dsn: str, target_dsn: str, **extra: Any) -> Migration:
    return parse_migration({"name": "t", "source": {"dsn": source_dsn}, "target": {"dsn": target_dsn}, **extra})


def preflight(source: Connection, target: Connection, migration: Migration) -> PreflightReport:
    return run_preflight(
        source, target, migration, disk_probe=LocalDiskProbe(), wal_rate_sample_seconds=WAL_SAMPLE_SECONDS
    )


def dbname(dsn: str) -> str:
    return str(parse_dsn(dsn)["dbname"])


@dataclass
class Pair:
    """Connections (as the superuser) to a new database on each server."""

    source: Connection
    target: Connection
    source_dsn: str
    target_dsn: str

    def migration(self, **extra: Any) -> Migration:
        return migration_for(self.source_dsn, self.target_dsn, **extra)

    def both(self, statement: str) -> None:
        execute(self.source, statement)
        execute(self.target, statement)

    def preflight(self, **extra: Any) -> PreflightReport:
        return preflight(self.source, self.target, self.migration(**extra))


@pytest.fixture
def dbs(fresh_dbs: tuple[str, str]) -> Iterator[Pair]:
    source_dsn, target_dsn = fresh_dbs
    source, target = connect(source_dsn), connect(target_dsn)
    try:
        yield Pair(source, target, source_dsn, target_dsn)
    finally:
        source.close()
        target.close()


@pytest.fixture
def shop(dbs: Pair) -> Pair:
    """The sample shop schema on both sides, data only on the source."""
    create_schema(dbs.source)
    create_schema(dbs.target)
    load_data(dbs.source, 2_000)
    return dbs


# --- the good pair -----------------------------------------------------------------------------


def test_good_pair_passes_with_no_failure(shop: Pair) -> None:
    # Given the sample schema on both servers, data on the source only

    # When the preflight runs
    report = shop.preflight()

    # Then nothing fails, and the only warning is the sample's sequence that no column owns
    assert report.ok, format_report(report)
    assert [c.name for c in report.warnings] == ["sequences"]
    assert report.get("sequences").details == [
        "public.invoice_no_seq: used in the default of public.orders.invoice_no, owned by no column"
    ]
    assert report.get("table_selection").measured.startswith("5 of 5 source tables selected")
    # free disk was measured on this machine, so the WAL estimate is compared with it
    assert "free disk unknown" not in report.get("wal_retention").measured
    # (that its WAL sample overlaps the other reads is shown without a clock: tests/unit/test_preflight_wal_sampler.py)


def test_report_reads_as_a_table(shop: Pair) -> None:
    # Given a good pair with a non-empty target table
    execute(shop.target, "INSERT INTO products (sku, name, price) VALUES ('X-1', 'leftover', 1)")

    # When the report is formatted
    text = format_report(shop.preflight())

    # Then each check has a status line, failures carry their fix, and the verdict closes it
    lines = text.splitlines()
    assert any(line.startswith("PASS  wal_level") for line in lines)
    assert any(line.startswith("FAIL  target_empty") for line in lines)
    assert "- public.products: 1 row(s)" in text
    assert "fix: The initial copy needs empty target tables" in text
    assert lines[-1].startswith("preflight: ") and "NOT ready" in lines[-1]


# --- tables ------------------------------------------------------------------------------------


def test_table_without_primary_key_or_identity_is_named(dbs: Pair) -> None:
    # Given a table with no primary key, one with REPLICA IDENTITY NOTHING, and one keyed by a unique index
    dbs.both(
        """
        CREATE TABLE audit_log (at timestamptz NOT NULL, message text);
        CREATE TABLE blobs (id int PRIMARY KEY, body text);
        ALTER TABLE blobs REPLICA IDENTITY NOTHING;
        CREATE TABLE tags (code text NOT NULL, label text);
        CREATE UNIQUE INDEX tags_code ON tags (code);
        ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_code;
        """,
    )

    # When the preflight runs
    report = dbs.preflight()

    # Then both unusable tables are named (not skipped), the index-keyed one is accepted
    check = report.get("replica_identity")
    assert check.status == "fail"
    assert check.details == [
        "public.audit_log: no primary key (replica identity default)",
        "public.blobs: REPLICA IDENTITY NOTHING",
    ]
    assert "ADD PRIMARY KEY" in check.remedy
    assert "UPDATE and DELETE on it FAILS ON THE SOURCE" in check.remedy
    assert not report.ok


def test_schema_mismatches_are_listed_column_by_column(dbs: Pair) -> None:
    # Given a target whose tables differ from the source's in each way that matters
    execute(
        dbs.source,
        """
        CREATE TABLE accounts (id int PRIMARY KEY, balance numeric(12,2) NOT NULL, note text, region text,
                               visits smallint);
        CREATE TABLE payments (id int PRIMARY KEY);
        """,
    )
    execute(
        dbs.target,
        """
        CREATE TABLE accounts (id int PRIMARY KEY, balance text NOT NULL, note text NOT NULL, visits bigint,
                               flagged boolean NOT NULL, comment text);
        """,
    )

    # When the preflight runs
    report = dbs.preflight()

    # Then every difference is listed, with the blocking ones failing the check
    check = report.get("target_schema")
    assert check.status == "fail"
    assert set(check.details) == {
        "FAIL: public.accounts.balance: type numeric(12,2) on the source, text on the target",
        "FAIL: public.accounts.note: NOT NULL on the target but nullable on the source",
        "FAIL: public.accounts.region: missing on the target (source type text)",
        "WARN: public.accounts.visits: type smallint on the source, bigint on the target (wider)",
        "FAIL: public.accounts.flagged: extra target column, NOT NULL without a default",
        "WARN: public.accounts.comment: extra target column (text), not on the source",
        "FAIL: public.payments: table missing on the target",
    }
    assert "pg_dump --schema-only" in check.remedy
    assert check.measured.startswith("1 of 2 selected tables exist on the target")


def test_only_nullability_loosening_and_extra_nullable_columns_warn(
    dbs: Pair,
) -> None:
    # Given a target that accepts everything the source holds, but is not identical
    execute(dbs.source, "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
    execute(
        dbs.target, "CREATE TABLE items (id int PRIMARY KEY, name text, added_at timestamptz NOT NULL DEFAULT now())"
    )

    # When the preflight runs
    check = dbs.preflight().get("target_schema")

    # Then the differences are reported as warnings only
    assert check.status == "warn"
    assert check.details == [
        "WARN: public.items.name: nullable on the target but NOT NULL on the source",
        "WARN: public.items.added_at: extra target column (timestamp with time zone), not on the source",
    ]


def test_non_empty_target_tables_fail_with_row_counts(
    shop: Pair,
) -> None:
    # Given rows left on the target in two sample tables, one of them with many rows
    execute(shop.target, "INSERT INTO customers (email, name) VALUES ('a@x', 'A'), ('b@x', 'B'), ('c@x', 'C')")
    execute(
        shop.target, "INSERT INTO products (sku, name, price) SELECT 'S' || g, 'p', 1 FROM generate_series(1, 1500) g"
    )

    # When the preflight runs
    check = shop.preflight().get("target_empty")

    # Then both are listed with their (capped) row counts and the fix names them
    assert check.status == "fail"
    assert check.details == ["public.customers: 3 row(s)", "public.products: more than 1000 row(s)"]
    assert "TRUNCATE public.customers, public.products" in check.remedy
    assert check.measured == "2 of 5 target tables hold rows"


def test_extension_missing_on_target_fails(dbs: Pair) -> None:
    # Given citext and hstore installed on the source only (plpgsql is everywhere and ignored)
    execute(dbs.source, "CREATE EXTENSION citext; CREATE EXTENSION hstore")
    execute(dbs.source, "CREATE TABLE people (id int PRIMARY KEY, email citext)")
    execute(dbs.target, "CREATE TABLE people (id int PRIMARY KEY, email text)")

    # When the preflight runs
    report = dbs.preflight()

    # Then the missing extensions are listed with the statement that installs them
    check = report.get("extensions")
    assert check.status == "fail"
    assert len(check.details) == 2
    assert check.details[0].startswith("citext ") and "CREATE EXTENSION citext;" in check.details[0]
    assert check.details[1].startswith("hstore ") and "CREATE EXTENSION hstore;" in check.details[1]
    assert "citext, hstore" in check.remedy
    # and the column typed by the extension differs too
    assert (
        "FAIL: public.people.email: type citext on the source, text on the target"
        in report.get("target_schema").details
    )


def test_unlogged_table_fails(dbs: Pair) -> None:
    # Given an unlogged table selected for migration
    execute(dbs.source, "CREATE UNLOGGED TABLE sessions (id int PRIMARY KEY, data text)")
    execute(dbs.target, "CREATE TABLE sessions (id int PRIMARY KEY, data text)")

    # When the preflight runs
    check = dbs.preflight().get("unlogged_tables")

    # Then it fails, naming the table and how to make it replicable
    assert check.status == "fail"
    assert check.details == ["public.sessions: UNLOGGED"]
    assert "ALTER TABLE <table> SET LOGGED" in check.remedy


def test_large_objects_are_unsupported(dbs: Pair) -> None:
    # Given a table referencing a large object through an oid column
    dbs.both("CREATE TABLE documents (id int PRIMARY KEY, content oid)")
    execute(dbs.source, "INSERT INTO documents VALUES (1, lo_from_bytea(0, 'hello'))")

    # When the preflight runs
    check = dbs.preflight().get("large_objects")

    # Then it fails, naming the column, and says how to move the data
    assert check.status == "fail"
    assert check.details == [
        "public.documents.content (oid)",
        "pg_largeobject_metadata holds 1 large object(s)",
    ]
    assert "bytea" in check.remedy and "lo_get" in check.remedy


def test_large_objects_without_a_referencing_column_warn(dbs: Pair) -> None:
    # Given a large object in the database but no oid/lo column among the selected tables
    dbs.both("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    execute(dbs.source, "SELECT lo_from_bytea(0, 'orphan')")

    # When the preflight runs
    check = dbs.preflight().get("large_objects")

    # Then it warns
    assert check.status == "warn"
    assert check.measured.startswith("1 large object(s) in the source database")


def test_sequence_used_in_default_but_owned_by_no_column_warns(dbs: Pair) -> None:
    # Given a sequence named in a default but owned by no column, next to an ordinary serial column
    dbs.both(
        """
        CREATE SEQUENCE ticket_no;
        CREATE TABLE tickets (id serial PRIMARY KEY, number bigint NOT NULL DEFAULT nextval('ticket_no'));
        """,
    )

    # When the preflight runs
    report = dbs.preflight()

    # Then it warns about that sequence only, and the migration is not blocked
    check = report.get("sequences")
    assert check.status == "warn"
    assert check.details == ["public.ticket_no: used in the default of public.tickets.number, owned by no column"]
    assert "cutover copies them" in check.remedy
    assert report.ok


def test_include_pattern_matching_nothing_fails(shop: Pair) -> None:
    # Given a migration whose include list has a typo, and a schema that does not exist
    include = ["public.orders", "public.ordr_items", "archive.*"]

    # When the preflight runs
    check = shop.preflight(tables={"include": include}).get("table_selection")

    # Then each pattern matching nothing is named, with a close match when there is one
    assert check.status == "fail"
    assert check.details == [
        "include pattern 'public.ordr_items' matches no table on the source; did you mean public.order_items?",
        "include pattern 'archive.*' matches no table on the source",
    ]
    assert "tables.include" in check.remedy


def test_partitioned_tables_replicate_through_their_root(dbs: Pair) -> None:
    # Given a partitioned table with two partitions on both sides
    dbs.both(
        """
        CREATE TABLE measurements (id bigint, at date NOT NULL, value float8, PRIMARY KEY (id, at))
            PARTITION BY RANGE (at);
        CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        """
    )
    execute(
        dbs.source, "INSERT INTO measurements SELECT g, date '2024-06-01' + g % 400, g FROM generate_series(1, 500) g"
    )

    # When only the partitioned root is selected
    report = dbs.preflight(tables={"include": ["public.measurements"]})

    # Then it passes with a note, and the copy estimate counts its partitions' data
    check = report.get("partitions")
    assert check.status == "pass"
    assert check.measured == "1 partitioned root(s), 0 partition(s) selected"
    assert check.details[0].startswith("public.measurements: partitioned; replicates through its root")
    assert "copy of 0 B" not in report.get("wal_retention").measured
    assert report.ok, format_report(report)

    # When the whole schema is selected (root and partitions)
    check = dbs.preflight().get("partitions")

    # Then the partitions are noted as replicating through the root
    assert check.status == "pass"
    assert check.measured == "1 partitioned root(s), 2 partition(s) selected"
    assert "public.measurements_2024: partition of public.measurements, replicates through it" in check.details

    # When one partition is selected without its root
    check = dbs.preflight(tables={"include": ["public.measurements_2024"]}).get("partitions")

    # Then it warns and suggests selecting the parent
    assert check.status == "warn"
    assert check.details == ["public.measurements_2024: partition of public.measurements, which is not selected"]
    assert "(public.measurements)" in check.remedy


# --- roles -------------------------------------------------------------------------------------


@pytest.fixture
def plain_role(pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[str]:
    """A LOGIN role with no REPLICATION and no SUPERUSER, on both servers (trust auth: no password)."""
    name = f"zdm_plain_{next(_role_counter)}"
    for server in pg_pair:
        server.psql(f"CREATE ROLE {name} LOGIN NOREPLICATION NOSUPERUSER")
    try:
        yield name
    finally:
        for server in pg_pair:
            server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
            server.psql(f"DROP ROLE IF EXISTS {name}")


def test_source_role_that_cannot_replicate_fails(
    pg_pair: tuple[PostgresServer, PostgresServer], shop: Pair, plain_role: str
) -> None:
    # Given the sample schema, and a source connection as a plain role that may not replicate
    source_server, _ = pg_pair
    source = connect(source_server.dsn(dbname(shop.source_dsn), user=plain_role))
    try:
        # When the preflight runs as that role
        report = preflight(source, shop.target, shop.migration())
    finally:
        source.close()

    # Then the role check fails and says how to grant replication; the other reads still worked
    check = report.get("source_role")
    assert check.status == "fail"
    assert check.measured == f"role {plain_role}: superuser=no, replication=no"
    assert check.details[0] == f"role {plain_role} may not replicate (no REPLICATION attribute, not superuser)"
    assert any("does not own public.customers, public.events" in d for d in check.details)
    assert any("no CREATE privilege on database" in d for d in check.details)
    assert any("may not SELECT from public.customers" in d for d in check.details)
    assert f"ALTER ROLE {plain_role} REPLICATION;" in check.remedy
    assert report.get("wal_level").status == "pass"
    assert report.get("replica_identity").status == "pass"


def test_a_role_that_may_not_switch_off_statement_logging_is_warned_and_nothing_is_changed(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, plain_role: str
) -> None:
    # Given a target server logging DDL (the password of CREATE SUBSCRIPTION would be logged), and a target
    # connection as a plain role, which may not change log_statement (a superuser-only setting)
    _, target_server = pg_pair
    dbs.both("CREATE TABLE t (id int PRIMARY KEY)")
    target_server.psql(f"ALTER DATABASE {dbname(dbs.target_dsn)} SET log_statement = 'ddl'")
    target = connect(target_server.dsn(dbname(dbs.target_dsn), user=plain_role))
    try:
        # When the preflight runs
        report = preflight(dbs.source, target, dbs.migration())
        # Then it warns for the target's log_statement, and for its default log_min_error_statement (a failed
        # CREATE SUBSCRIPTION is logged), naming the role; the source's superuser may switch both off
        check = report.get("subscription_password_logging")
        assert check.status == "warn"
        assert [d.split(" and role")[0] for d in check.details] == [
            "target: log_min_error_statement = error",
            "target: log_statement = ddl",
        ]
        assert f"GRANT SET ON PARAMETER log_min_error_statement, log_statement TO {plain_role};" in check.remedy
        # And the probe changed nothing: the session still logs DDL
        assert fetch_value(target, "SHOW log_statement") == "ddl"
        # And once the remedy is applied, the check passes
        target_server.psql(f"GRANT SET ON PARAMETER log_min_error_statement, log_statement TO {plain_role}")
        again = preflight(dbs.source, target, dbs.migration()).get("subscription_password_logging")
        assert again.status == "pass", again
    finally:
        target.close()
        target_server.psql(f"REVOKE SET ON PARAMETER log_min_error_statement, log_statement FROM {plain_role}")
        target_server.psql(f"ALTER DATABASE {dbname(dbs.target_dsn)} RESET log_statement")


def test_pgaudit_logging_ddl_is_warned_for_a_role_that_may_not_switch_it_off_until_the_role_is_left_out() -> None:
    # Given servers with pgaudit logging DDL (CREATE SUBSCRIPTION's text, password included, would be
    # audited), and a target connection as a plain role, which may not change pgaudit.log
    role = "zdm_audited"
    with server_pair("pf-pgaudit", {"shared_preload_libraries": "pgaudit", "pgaudit.log": "ddl"}) as servers:
        for server in servers:
            server.create_database("pf")
            server.psql(f"CREATE ROLE {role} LOGIN; GRANT SET ON PARAMETER log_min_error_statement TO {role}")
            server.psql("CREATE TABLE t (id int PRIMARY KEY)", "pf")
        source_server, target_server = servers
        migration = migration_for(source_server.dsn("pf"), target_server.dsn("pf"))
        source = connect(source_server.dsn("pf"))
        target = connect(target_server.dsn("pf", user=role))
        try:
            # When the preflight runs
            check = preflight(source, target, migration).get("subscription_password_logging")
            # Then it warns for the target's pgaudit.log alone (the source's superuser may switch it off), with
            # the grant, and the ALTER ROLE that RDS documents for leaving a role out of the audit
            assert check.status == "warn"
            assert [d.split(" and role")[0] for d in check.details] == ["target: pgaudit.log = ddl"]
            assert f"GRANT SET ON PARAMETER pgaudit.log TO {role};" in check.remedy
            assert f"ALTER ROLE {role} SET pgaudit.log = 'none';" in check.remedy
            # And once the role is left out of the audit, a new session passes
            target_server.psql(f"ALTER ROLE {role} SET pgaudit.log = 'none'")
            target.close()
            target = connect(target_server.dsn("pf", user=role))
            again = preflight(source, target, migration).get("subscription_password_logging")
            assert again.status == "pass", again
        finally:
            source.close()
            target.close()


def test_target_role_that_cannot_create_a_subscription_fails(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, plain_role: str
) -> None:
    # Given a target connection as a plain role on PostgreSQL 15
    _, target_server = pg_pair
    dbs.both("CREATE TABLE t (id int PRIMARY KEY)")
    target = connect(target_server.dsn(dbname(dbs.target_dsn), user=plain_role))
    try:
        # When the preflight runs
        report = preflight(dbs.source, target, dbs.migration())
    finally:
        target.close()

    # Then it fails: only superusers create subscriptions before PostgreSQL 16
    check = report.get("target_role")
    assert check.status == "fail"
    assert check.measured == f"role {plain_role} on PostgreSQL 15: superuser=no"
    assert "lets only superusers create subscriptions" in check.remedy
    # and the target table it may not read is reported as unchecked rather than assumed empty
    assert report.get("target_empty").status == "warn"
    assert report.get("target_empty").details == ["public.t: not readable by the target role"]


def test_materialized_views_the_target_lacks_or_its_role_may_not_refresh_fail(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, plain_role: str
) -> None:
    # Given views over a selected table: one restored on the target but owned by another role than the
    # target's, one not restored there at all, one in a schema the selection leaves out
    _, target_server = pg_pair
    dbs.both("CREATE TABLE t (id int PRIMARY KEY); CREATE SCHEMA reports")
    dbs.both("CREATE MATERIALIZED VIEW t_count AS SELECT count(*) FROM t")
    dbs.both("CREATE MATERIALIZED VIEW reports.daily AS SELECT count(*) FROM t")
    execute(dbs.source, "CREATE MATERIALIZED VIEW t_ids AS SELECT id FROM t")
    target = connect(target_server.dsn(dbname(dbs.target_dsn), user=plain_role))
    try:
        # When the preflight runs with the target's role not owning the views
        check = preflight(dbs.source, target, dbs.migration(tables={"include": ["public.*"]})).get("materialized_views")
    finally:
        target.close()

    # Then it fails, naming both views and how to fix each
    assert check.status == "fail"
    assert check.details == [
        "public.t_ids: missing on the target",
        f"public.t_count: the target's role {plain_role} is not its owner (REFRESH needs the owner)",
    ]
    assert (
        check.measured
        == "2 selected materialized view(s), 2 to refresh on the target before reads move; 1 not selected"
    )
    assert "ALTER MATERIALIZED VIEW <view> OWNER TO <role>" in check.remedy


def test_materialized_views_the_selection_leaves_out_are_named(dbs: Pair) -> None:
    # Given a view on both sides in a schema the selection leaves out
    dbs.both("CREATE TABLE t (id int PRIMARY KEY); CREATE SCHEMA reports")
    dbs.both("CREATE MATERIALIZED VIEW reports.daily AS SELECT count(*) FROM t")

    # When the preflight runs over public.* only
    check = dbs.preflight(tables={"include": ["public.*"]}).get("materialized_views")

    # Then it warns: the target's view stays as it is unless someone refreshes it
    assert check.status == "warn"
    assert check.details == ["reports.daily"]
    assert "REFRESH" in check.remedy


def test_a_standby_on_either_side_is_refused_by_name_before_any_other_check(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair
) -> None:
    # Given a hot standby of the source server (a read replica's endpoint), streaming from it
    source_server, _ = pg_pair
    dbs.both("CREATE TABLE t (id int PRIMARY KEY)")
    with standby_of(source_server) as standby:
        replica_dsn = standby.dsn(dbname(dbs.source_dsn))
        replica = connect(replica_dsn)
        try:
            # When the preflight runs with the replica as the source, then as the target
            as_source = preflight(replica, dbs.target, migration_for(replica_dsn, dbs.target_dsn))
            as_target = preflight(dbs.source, replica, migration_for(dbs.source_dsn, replica_dsn))
        finally:
            replica.close()

    # Then each stops at the check naming the side (the WAL rate sample once failed there with
    # "recovery is in progress"), and says where to point it
    for report, side in ((as_source, "source"), (as_target, "target")):
        assert [c.name for c in report.checks] == ["server_version", "primary_servers"]
        check = report.get("primary_servers")
        assert check.status == "fail"
        assert check.details == [f"{side}: in recovery (a standby)"]
        assert f"Point '{side}' in the migration file at the primary" in check.remedy


# --- server settings ---------------------------------------------------------------------------


class Writer:
    """Writes continuously on its own connection so that the source generates WAL."""

    def __init__(self, dsn: str) -> None:
        self.conn = connect(dsn)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            execute(self.conn, "INSERT INTO ledger (note) SELECT repeat('x', 200) FROM generate_series(1, 200)")

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.conn.close()


def test_max_slot_wal_keep_size_too_small_fails(pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair) -> None:
    # Given a source letting a slot keep only 1 MB of WAL, a table being written to, and a slow expected copy
    source_server, _ = pg_pair
    dbs.both("CREATE TABLE ledger (id bigserial PRIMARY KEY, note text)")
    execute(dbs.source, "INSERT INTO ledger (note) SELECT repeat('x', 200) FROM generate_series(1, 5000)")
    source_server.psql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    source_server.psql("SELECT pg_reload_conf()")
    try:
        # When the preflight samples the WAL rate while the application writes
        with Writer(dbs.source_dsn):
            report = dbs.preflight(engine={"logical": {"expected_copy_mb_per_s": 0.05}})
    finally:
        source_server.psql("ALTER SYSTEM RESET max_slot_wal_keep_size")
        source_server.psql("SELECT pg_reload_conf()")

    # Then the retention check fails and says how to fix it
    check = report.get("wal_retention")
    assert check.status == "fail", check
    assert "max_slot_wal_keep_size=1.0 MB" in check.measured
    assert "ALTER SYSTEM SET max_slot_wal_keep_size" in check.remedy
    assert "expected_copy_mb_per_s" in check.remedy


def test_wal_level_not_logical_fails(dbs: Pair) -> None:
    # Given a source server running with wal_level=replica
    replica_level = start_server("wal-replica", settings={"wal_level": "replica"})
    try:
        replica_level.create_database("app")
        run_sql(replica_level.dsn("app"), "CREATE TABLE t (id int PRIMARY KEY)")
        execute(dbs.target, "CREATE TABLE t (id int PRIMARY KEY)")
        source = connect(replica_level.dsn("app"))
        try:
            # When the preflight runs
            report = preflight(source, dbs.target, migration_for(replica_level.dsn("app"), dbs.target_dsn))
        finally:
            source.close()
    finally:
        replica_level.stop()

    # Then it fails with the setting to change and the restart it needs
    check = report.get("wal_level")
    assert check.status == "fail"
    assert check.measured == "source wal_level=replica"
    assert "ALTER SYSTEM SET wal_level = 'logical'" in check.remedy
    assert "restart" in check.remedy
    assert not report.ok


def test_preflight_only_reads(shop: Pair) -> None:
    # Given a good pair
    # When the preflight runs
    shop.preflight()

    # Then it created no slot, publication or subscription on either side
    for conn in (shop.source, shop.target):
        with conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)"
                " + (SELECT count(*) FROM pg_subscription)"
            )
            row = cur.fetchone()
            assert row is not None and row[0] == 0


def test_connection_not_in_autocommit_is_left_idle(fresh_dbs: tuple[str, str]) -> None:
    # Given connections not in autocommit
    source_dsn, target_dsn = fresh_dbs
    source = psycopg2.connect(source_dsn)
    target = psycopg2.connect(target_dsn)
    try:
        # When the preflight runs
        run_preflight(source, target, migration_for(source_dsn, target_dsn), wal_rate_sample_seconds=0.05)

        # Then it leaves no transaction open on either
        assert source.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert target.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        source.close()
        target.close()


def test_debezium_engine_fails_columns_its_connector_leaves_out_or_cannot_carry(dbs: Pair) -> None:
    # Given a table with a composite, an array of composites, a box, a timetz and enum columns
    dbs.both(
        "CREATE TYPE pair AS (a integer, b text); CREATE TYPE mood AS ENUM ('sad', 'ok');"
        " CREATE TABLE odd (id int PRIMARY KEY, pr pair, prs pair[], bx box, opens timetz, m mood, ms mood[]);"
        " ALTER TABLE odd REPLICA IDENTITY FULL"
    )
    # When the preflight runs for engine debezium
    check = dbs.preflight(engine={"type": "debezium"}).get("change_stream_types")
    # Then it fails naming each of the first four (read from the real catalog), not the enums
    assert check.status == "fail"
    assert [d.split(" (")[0] for d in check.details] == [
        "public.odd.pr",
        "public.odd.prs",
        "public.odd.bx",
        "public.odd.opens",
    ]


def test_debezium_engine_fails_arrays_and_dates_it_would_send_wrongly_found_by_scanning_the_source(dbs: Pair) -> None:
    # Given array columns: one holding a 2-D value, one a value whose first index is 0, and one holding only
    # one-dimensional arrays from index 1, empty arrays and NULLs (a generated array column is never sent); and
    # date columns, one holding dates BC
    dbs.both(
        "CREATE TABLE grids (id int PRIMARY KEY, grid integer[], shifted text[], plain text[],"
        " twice integer[] GENERATED ALWAYS AS (ARRAY[id, id]) STORED, born date, seen date);"
        " ALTER TABLE grids REPLICA IDENTITY FULL"
    )
    execute(
        dbs.source,
        "INSERT INTO grids (id, grid, shifted, plain, born, seen) VALUES"
        " (1, '{{1,2},{3,4}}', '{a}', '{x,y}', '0044-03-15 BC', '-infinity'),"
        " (2, '{5}', '[0:1]={b,c}', '{}', '0001-01-01', 'infinity'), (3, NULL, NULL, NULL, NULL, '2024-01-01'),"
        " (4, '{{7}}', '{d}', '{z}', '4713-01-01 BC', '0001-01-01')",
    )
    timeout = fetch_value(dbs.source, "SELECT current_setting('statement_timeout')")
    # When the preflight runs for engine debezium
    check = dbs.preflight(engine={"type": "debezium"}).get("change_stream_types")
    # Then it fails naming the two array columns and the date column holding dates BC, with how many such
    # values each holds, not the others (a date's -infinity is carried)
    assert check.status == "fail"
    assert check.details == [
        "public.grids.grid (integer[]): 2 value(s)",
        "public.grids.shifted (text[]): 1 value(s)",
        "public.grids.born (date): 2 value(s)",
    ]
    assert "'{{1,2},{3,4}}' arrives as '{NULL,NULL}'" in check.remedy
    assert fetch_value(dbs.source, "SELECT current_setting('statement_timeout')") == timeout  # put back as it was
    # And once the values are one-dimensional from index 1 it only warns, naming every array column
    execute(dbs.source, "UPDATE grids SET grid = '{1}', shifted = '{b}', born = '2000-01-01' WHERE id IN (1, 2, 4)")
    clean = dbs.preflight(engine={"type": "debezium"}).get("change_stream_types")
    assert (clean.status, clean.details) == (
        "warn",
        ["public.grids.grid", "public.grids.shifted", "public.grids.plain"],
    )
    # And the logical engine, which carries arrays as they are, scans nothing
    assert dbs.preflight().get("change_stream_types").status == "pass"


def test_the_value_scan_names_the_tables_it_had_no_time_for_and_puts_the_timeout_back(dbs: Pair) -> None:
    # Given a table of 300,000 rows with an array column, and a session statement timeout of 10 minutes
    execute(dbs.source, "CREATE TABLE big (id int PRIMARY KEY, tags text[])")
    execute(dbs.source, "INSERT INTO big SELECT g, ARRAY[g::text] FROM generate_series(1, 300000) g")
    execute(dbs.source, "SET statement_timeout = '10min'")
    infos = describe_tables(dbs.source, [TableName("public", "big")])
    # When the scan has 5 ms for it, and then nothing left
    scanned = values_sent_wrongly(dbs.source, infos.values(), budget_seconds=0.005)
    # Then the table is named as not scanned, nothing as found, and the session's timeout is as it was
    assert scanned == SentWrongly([], [], [TableName("public", "big")])
    assert fetch_value(dbs.source, "SELECT current_setting('statement_timeout')") == "10min"
    # And with time enough it scans it and finds nothing
    assert values_sent_wrongly(dbs.source, infos.values()) == SentWrongly([], [], [])


def test_a_target_that_reaches_the_source_database_fails_before_anything_else(fresh_dbs: tuple[str, str]) -> None:
    # Given a target DSN written differently from the source's but reaching the very same database
    source_dsn, _ = fresh_dbs
    run_sql(source_dsn, "CREATE TABLE public.orders (id bigint PRIMARY KEY, note text)")
    other_spelling = source_dsn.replace("host=127.0.0.1", "host=localhost")
    assert other_spelling != source_dsn
    with connect(source_dsn) as source, connect(other_spelling) as target:
        # When preflight runs
        report = preflight(source, target, migration_for(source_dsn, other_spelling))
    # Then it fails naming the mistake (the engine would replicate the database into itself and fence it)
    failed = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in failed] == ["distinct_databases"]
    assert "reach the same database" in failed[0].measured and "Point 'target'" in failed[0].remedy


# -- configurations that pass everything above, yet break the migration: each test first shows the real
# failure on the servers (an error on the source, a stalled apply, a dropped slot), then asks preflight


def test_partitioned_root_with_replica_identity_full_but_keyless_partitions_is_refused(dbs: Pair) -> None:
    # Given a keyless partitioned table whose root (only) is REPLICA IDENTITY FULL: ALTER TABLE on the
    # root does not reach its partitions, which keep REPLICA IDENTITY DEFAULT without a key
    dbs.both(
        """
        CREATE TABLE m (id bigint, at date NOT NULL, v int) PARTITION BY RANGE (at);
        CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        ALTER TABLE m REPLICA IDENTITY FULL;
        """
    )
    execute(dbs.source, "INSERT INTO m VALUES (1, '2024-06-01', 1)")

    # When the preflight runs with only the root selected
    report = dbs.preflight(tables={"include": ["public.m"]})

    # Then it must not pass: once m is published, every UPDATE/DELETE on its partition fails on the source
    execute(dbs.source, "CREATE PUBLICATION audit_pub FOR TABLE m WITH (publish_via_partition_root = true)")
    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState):
        execute(dbs.source, "UPDATE m SET v = 2")
    assert report.get("replica_identity").status == "fail", format_report(report)


def test_sequence_missing_on_the_target_is_refused(dbs: Pair) -> None:
    # Given a serial column on the source; the target table has a plain integer key, no sequence
    execute(dbs.source, "CREATE TABLE t (id serial PRIMARY KEY, v int)")
    execute(dbs.target, "CREATE TABLE t (id integer PRIMARY KEY, v int)")
    execute(dbs.source, "INSERT INTO t (v) VALUES (1)")

    # When the preflight runs
    report = dbs.preflight()

    # Then the cutover's sequence step would fail (it is reached with writes fenced)...
    with pytest.raises(SequenceSyncError, match="does not exist here"):
        sync_sequences(dbs.source, dbs.target, [TableName("public", "t")])
    # ...so the preflight must not pass
    assert report.get("sequences").status == "fail", format_report(report)


def test_a_role_that_overrides_default_transaction_read_only_is_reported(dbs: Pair) -> None:
    # Given a source role with its own default_transaction_read_only (e.g. a reporting role)
    execute(dbs.source, "CREATE TABLE t (id int PRIMARY KEY)")
    execute(dbs.target, "CREATE TABLE t (id int PRIMARY KEY)")
    execute(dbs.source, "DROP ROLE IF EXISTS zdm_audit_ro")
    execute(dbs.source, "CREATE ROLE zdm_audit_ro LOGIN")
    try:
        execute(
            dbs.source,
            f'ALTER ROLE zdm_audit_ro IN DATABASE "{dbname(dbs.source_dsn)}" SET default_transaction_read_only = off',
        )

        # When the preflight runs
        report = dbs.preflight()

        # Then the cutover's fence would refuse...
        with pytest.raises(FenceError, match="zdm_audit_ro"):
            take_fence(dbs.source, DnsLikeRouter(), grace=0.1, timeout=1)
        # ...so the preflight must say so
        assert report.get("writers_the_fence_cannot_stop").status == "warn", format_report(report)
        assert "zdm_audit_ro" in " ".join(report.get("writers_the_fence_cannot_stop").details)
    finally:
        execute(dbs.source, f'ALTER ROLE zdm_audit_ro IN DATABASE "{dbname(dbs.source_dsn)}" RESET ALL')
        execute(dbs.source, "DROP ROLE zdm_audit_ro")


@pytest.fixture
def replicating_owner(pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair) -> Iterator[str]:
    """On the source: a role with REPLICATION that owns the migrated table and may CREATE in the database,
    but is neither superuser nor the database's owner (the least preflight's source_role asks for)."""
    source_server, _ = pg_pair
    name = "zdm_audit_owner"
    source_server.psql(f"DROP ROLE IF EXISTS {name}")
    source_server.psql(f"CREATE ROLE {name} LOGIN REPLICATION NOSUPERUSER")
    execute(dbs.source, f'GRANT CREATE ON DATABASE "{dbname(dbs.source_dsn)}" TO {name}')
    try:
        yield name
    finally:
        source_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
        execute(dbs.source, f"DROP OWNED BY {name}")
        source_server.psql(f"DROP ROLE IF EXISTS {name}")


def given_table_owned_by(pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, owner: str, rows: int) -> str:
    """Table t on both sides, owned by `owner` on the source with `rows` rows there; the source DSN as `owner`."""
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(dbs.source, f"ALTER TABLE t OWNER TO {owner}")
    execute(dbs.source, f"INSERT INTO t SELECT g, g FROM generate_series(1, {int(rows)}) g; ANALYZE t")
    return pg_pair[0].dsn(dbname(dbs.source_dsn), user=owner)


def test_source_role_that_cannot_fence_or_receive_the_reverse_replication_is_refused(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, replicating_owner: str
) -> None:
    # Given a table owned by the replicating (non-superuser, non-database-owner) source role
    role_dsn = given_table_owned_by(pg_pair, dbs, replicating_owner, rows=1)
    source = connect(role_dsn)
    try:
        # When the preflight runs as that role
        report = preflight(source, dbs.target, dbs.migration())
        assert report.get("source_role").status == "pass"  # what it asks for is all there

        # Then the cutover could neither fence the source (ALTER DATABASE needs its owner)...
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            take_fence(source, DnsLikeRouter(), grace=0.1, timeout=1)
        # ...nor start the replication back from the target (CREATE SUBSCRIPTION needs a superuser on PG15)
        back = LogicalReplicationPlan(
            ReplicationNames("zdm_audit_rev"), (TableName("public", "t"),), LogicalSettings(), initial_copy=False
        )
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="superuser"):
            LogicalEngine(dbs.target_dsn, role_dsn, back).start()
    finally:
        source.close()
        execute(dbs.target, "DROP PUBLICATION IF EXISTS zdm_audit_rev")
    # ...so the preflight must not pass
    assert report.get("cutover_rights").status == "fail", format_report(report)


def test_a_source_that_cannot_run_the_reverse_subscription_is_refused() -> None:
    # Given a source that runs no logical replication worker (max_logical_replication_workers = 0):
    # the forward replication needs none there, but the replication back after the cutover runs on it
    source = start_server("audit-noworkers-src", settings={"max_logical_replication_workers": "0"})
    target = start_server("audit-noworkers-tgt")
    try:
        source.create_database("app")
        target.create_database("app")
        for server in (source, target):
            server.psql("CREATE TABLE t (id int PRIMARY KEY, v int)", "app")
        src, tgt = connect(source.dsn("app")), connect(target.dsn("app"))
        try:
            # When the preflight runs
            report = preflight(src, tgt, migration_for(source.dsn("app"), target.dsn("app")))

            # Then the replication back (what a rollback needs) would never apply anything on the source...
            back = LogicalReplicationPlan(
                ReplicationNames("zdm_audit_rev"), (TableName("public", "t"),), LogicalSettings(), initial_copy=False
            )
            LogicalEngine(target.dsn("app"), source.dsn("app"), back).start()
            execute(tgt, "INSERT INTO t VALUES (1, 1)")
            time.sleep(3)
            assert fetch_value(src, "SELECT count(*) FROM t") == 0
            assert fetch_value(src, "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL") == 0
        finally:
            src.close()
            tgt.close()
        # ...so the preflight must not pass
        assert report.get("reverse_replication").status == "fail", format_report(report)
    finally:
        source.stop()
        target.stop()


def _forward(dbs: Pair, *tables: str) -> LogicalEngine:
    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_audit"), tuple(TableName.parse(t) for t in tables), LogicalSettings()
    )
    return LogicalEngine(dbs.source_dsn, dbs.target_dsn, plan)


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_target_table_without_a_key_the_apply_can_use_is_refused(dbs: Pair) -> None:
    # Given a table with a primary key on the source, created without one on the target
    execute(dbs.source, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(dbs.target, "CREATE TABLE t (id int NOT NULL, v int)")
    execute(dbs.source, "INSERT INTO t VALUES (1, 1)")

    # When the preflight runs
    report = dbs.preflight()

    # Then the migration's apply would stop at the first UPDATE (the target has no replica identity)...
    _forward(dbs, "public.t").start()
    execute(dbs.source, "UPDATE t SET v = 2 WHERE id = 1")
    assert _wait(
        lambda: (
            fetch_value(dbs.target, "SELECT coalesce(sum(apply_error_count), 0) FROM pg_stat_subscription_stats") > 0
        )
    )
    assert fetch_value(dbs.target, "SELECT v FROM t WHERE id = 1") == 1
    # ...so the preflight must not pass
    assert report.get("target_schema").status == "fail", format_report(report)


def test_a_target_check_constraint_the_source_lacks_is_reported(dbs: Pair) -> None:
    # Given a CHECK (and a UNIQUE) on the target that the source's rows break
    execute(dbs.source, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(dbs.target, "CREATE TABLE t (id int PRIMARY KEY, v int CHECK (v > 0))")
    execute(dbs.source, "INSERT INTO t VALUES (1, -1)")

    # When the preflight runs
    report = dbs.preflight()

    # Then the copy would fail on the target...
    with pytest.raises(Exception, match="check constraint"):
        _forward(dbs, "public.t").start()
    # ...so the preflight must at least name the difference
    assert report.get("target_schema").status == "warn", format_report(report)


def test_a_deferrable_primary_key_is_not_a_replica_identity(dbs: Pair) -> None:
    # Given a table whose only key is a DEFERRABLE primary key (PostgreSQL never uses a
    # non-immediate index as replica identity)
    dbs.both("CREATE TABLE t (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v int)")
    execute(dbs.source, "INSERT INTO t VALUES (1, 1)")

    # When the preflight runs
    report = dbs.preflight()

    # Then, once the table is published, every UPDATE on the source fails...
    execute(dbs.source, "CREATE PUBLICATION audit_pub FOR TABLE t")
    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="replica identity"):
        execute(dbs.source, "UPDATE t SET v = 2")
    # ...so the preflight must refuse it
    assert report.get("replica_identity").status == "fail", format_report(report)


def test_a_slot_of_the_same_name_in_another_database_is_reported(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair
) -> None:
    # Given, on the source server, a replication slot named as this migration's ('zdm_t') that belongs to
    # another database (another migration of the same name, from another database of the server)
    source_server, _ = pg_pair
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, v int)")
    source_server.create_database("audit_other")
    source_server.psql("SELECT pg_create_logical_replication_slot('zdm_t', 'pgoutput')", "audit_other")
    try:
        # When the preflight runs for migration 't'
        report = dbs.preflight()

        # Then starting the migration drops the other database's slot...
        plan = LogicalReplicationPlan(
            ReplicationNames(dbs.migration().slot_name), (TableName("public", "t"),), LogicalSettings()
        )
        LogicalEngine(dbs.source_dsn, dbs.target_dsn, plan).start()
        assert (
            source_server.psql(
                "SELECT count(*) FROM pg_replication_slots s WHERE slot_name = 'zdm_t' AND database = 'audit_other'"
            )
            == "0"
        )
        # ...so the preflight must say so before
        assert report.get("slot_names").status == "fail", format_report(report)
    finally:
        source_server.psql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'audit_other'"
        )
        source_server.psql('DROP DATABASE IF EXISTS "audit_other"')


def test_a_target_database_whose_encoding_cannot_hold_the_source_text_is_reported(
    pg_pair: tuple[PostgresServer, PostgresServer],
) -> None:
    # Given a UTF8 source database holding text LATIN1 cannot represent, and a LATIN1 target database
    source_server, target_server = pg_pair
    source_server.create_database("audit_enc")
    target_server.psql("CREATE DATABASE audit_enc TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
    src, tgt = connect(source_server.dsn("audit_enc")), connect(target_server.dsn("audit_enc"))
    try:
        for conn in (src, tgt):
            execute(conn, "CREATE TABLE t (id int PRIMARY KEY, note text)")
        execute(src, "INSERT INTO t VALUES (1, '東京')")
        pair = Pair(src, tgt, source_server.dsn("audit_enc"), target_server.dsn("audit_enc"))

        # When the preflight runs
        report = pair.preflight()

        # Then the copy fails on the target...
        with pytest.raises(Exception, match="has no equivalent in encoding"):
            _forward(pair, "public.t").start()
        # ...so the preflight must name the encoding difference
        assert report.get("database_encoding").status == "warn", format_report(report)
    finally:
        src.close()
        tgt.close()
        source_server.psql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'audit_enc'"
        )
        source_server.psql("DROP DATABASE IF EXISTS audit_enc WITH (FORCE)")
        target_server.psql("DROP DATABASE IF EXISTS audit_enc WITH (FORCE)")


def test_a_sequence_the_source_role_may_not_read_is_refused(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, replicating_owner: str
) -> None:
    # Given a table owned by the replicating source role whose default draws from a sequence it may not read
    source_server, _ = pg_pair
    execute(dbs.source, "CREATE SEQUENCE shared_no")
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, n bigint)")
    execute(dbs.source, "ALTER TABLE t ALTER n SET DEFAULT nextval('shared_no')")
    execute(dbs.target, "CREATE SEQUENCE shared_no")
    execute(dbs.source, f"ALTER TABLE t OWNER TO {replicating_owner}")
    execute(dbs.source, "INSERT INTO t (id) VALUES (1)")
    source = connect(source_server.dsn(dbname(dbs.source_dsn), user=replicating_owner))
    try:
        # When the preflight runs as that role
        report = preflight(source, dbs.target, dbs.migration())

        # Then the cutover's sequence step (run with writes fenced) would fail...
        with pytest.raises(SequenceSyncError, match="may not read it"):
            sync_sequences(source, dbs.target, [TableName("public", "t")])
    finally:
        source.close()
    # ...so the preflight's sequences check must not pass (it only warned that no column owns the sequence)
    assert report.get("sequences").status == "fail", format_report(report)


def test_a_target_trigger_that_fires_on_replicated_writes_is_named(dbs: Pair) -> None:
    # Given a target table with an audit trigger set ENABLE ALWAYS (it fires even for replication's writes)
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, v int); CREATE TABLE audit (id serial PRIMARY KEY, t_id int)")
    execute(
        dbs.target,
        """
        CREATE FUNCTION note_write() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN INSERT INTO public.audit (t_id) VALUES (NEW.id); RETURN NEW; END $$;
        CREATE TRIGGER t_audit AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION note_write();
        ALTER TABLE t ENABLE ALWAYS TRIGGER t_audit;
        """,
    )
    execute(dbs.source, "INSERT INTO t VALUES (1, 1)")

    # When the preflight runs
    report = dbs.preflight(tables={"include": ["public.t"]})

    # Then the migration's copy and apply fire it on the target (a second audit row per replicated row)...
    _forward(dbs, "public.t").start()
    execute(dbs.source, "INSERT INTO t VALUES (2, 2)")
    assert _wait(lambda: fetch_value(dbs.target, "SELECT count(*) FROM audit") == 2, timeout=30)
    # ...so the preflight names it
    check = report.get("triggers_firing_on_replication")
    assert check.status == "warn", format_report(report)
    assert check.details == ["target: public.t: trigger t_audit (ENABLE ALWAYS)"]


def test_a_role_connection_limit_below_the_migrations_sessions_fails_and_the_copy_would_indeed_fail(
    pg_pair: tuple[PostgresServer, PostgresServer], dbs: Pair, replicating_owner: str
) -> None:
    # Given the source role (it owns the table and may replicate) limited to 3 sessions
    role_dsn = given_table_owned_by(pg_pair, dbs, replicating_owner, rows=10_000)
    pg_pair[0].psql(f"ALTER ROLE {replicating_owner} CONNECTION LIMIT 3")
    source = connect(role_dsn)
    try:
        # When the preflight runs for 4 copy workers and 8 validation chunks
        migration = dbs.migration(engine={"type": "logical", "logical": {"copy_workers": 4}})
        check = preflight(source, dbs.target, migration).get("connection_capacity")
    finally:
        source.close()

    # Then it fails: 1 + 8 sessions and the walsender do not fit in 3
    assert check.status == "fail"
    assert check.details == [
        f"source: role {replicating_owner} has CONNECTION LIMIT 3 with 0 session(s) open; the migration opens up to 10"
    ]
    # And what it foresees is real: the copy's 4 workers (10 chunks) cannot all connect
    settings = LogicalSettings(copy_workers=4, copy_chunk_rows=1000)
    plan = LogicalReplicationPlan(ReplicationNames("zdm_connlimit"), (TableName("public", "t"),), settings)
    engine = LogicalEngine(role_dsn, dbs.target_dsn, plan)
    try:
        with pytest.raises(Exception, match="too many connections for role"):
            engine.start()
    finally:
        engine.teardown()


def test_a_foreign_key_to_a_table_left_out_fails_until_the_table_is_selected(dbs: Pair) -> None:
    # Given orders referencing customers (and a partitioned root referencing itself through a partition),
    # with only orders selected, and the target's customers empty
    dbs.both(
        "CREATE TABLE customers (id int PRIMARY KEY);"
        " CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers);"
        " CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);"
        " CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100);"
        " CREATE TABLE n (id int PRIMARY KEY, m_id int REFERENCES m)"
    )
    execute(dbs.source, "INSERT INTO customers VALUES (1); INSERT INTO orders VALUES (1, 1)")

    # When the preflight runs, Then it fails naming the constraint and the table left out
    report = dbs.preflight(tables={"include": ["public.orders", "public.m", "public.n"]})
    check = report.get("references_outside_selection")
    assert check.status == "fail"
    assert check.details == [
        "public.orders: orders_customer_id_fkey references public.customers, which is not selected and is empty "
        "on the target"
    ]

    # And with customers already filled on the target by other means it only warns
    execute(dbs.target, "INSERT INTO customers VALUES (1)")
    report = dbs.preflight(tables={"include": ["public.orders", "public.m", "public.n"]})
    assert report.get("references_outside_selection").status == "warn"

    # And with customers selected it passes
    report = dbs.preflight(tables={"include": ["public.orders", "public.customers", "public.m", "public.n"]})
    assert report.get("references_outside_selection").status == "pass"


def test_a_rolled_back_executions_replication_fails_the_start_until_abandoned(dbs: Pair) -> None:
    # Given this migration's replication, started and copied, then stopped as a rollback before the cutover
    # stops it (kept: its slot holds the source's WAL), and the target's tables emptied as target_empty says
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(dbs.source, "INSERT INTO t SELECT g, g FROM generate_series(1, 500) g")
    plan = LogicalReplicationPlan(
        ReplicationNames(dbs.migration().slot_name), (TableName("public", "t"),), LogicalSettings()
    )
    engine = LogicalEngine(dbs.source_dsn, dbs.target_dsn, plan)
    engine.start()
    assert _wait(lambda: fetch_value(dbs.target, "SELECT count(*) FROM t") == 500)
    engine.stop()
    execute(dbs.target, "TRUNCATE t")

    # When the preflight runs for a new execution
    report = dbs.preflight()

    # Then it fails, naming what the earlier execution left on each side
    result = report.get("earlier_attempt")
    assert result.status == "fail", format_report(report)
    assert result.details == [
        "source: replication slot zdm_t (keeps WAL until it is dropped)",
        "source: publication zdm_t",
        "target: subscription zdm_t (disabled)",
    ]
    assert '{"action": "abandon"}' in result.remedy
    # ...as it must: a start resumes the stopped replication and copies nothing, the target stays empty
    engine.start()
    execute(dbs.source, "INSERT INTO t VALUES (501, 501)")
    assert _wait(lambda: fetch_value(dbs.target, "SELECT count(*) FROM t") == 1)
    assert fetch_value(dbs.target, "SELECT count(*) FROM t WHERE id <= 500") == 0

    # And once abandoned (the teardown), nothing is left and the check passes
    engine.teardown()
    assert dbs.preflight().get("earlier_attempt").status == "pass"


def test_a_target_fenced_by_a_rollback_after_the_cutover_fails_the_start_until_lifted(dbs: Pair) -> None:
    # Given a target left fenced read-only (as a rollback after the cutover leaves it) and emptied by a
    # session that lifted the fence for itself
    dbs.both("CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(dbs.source, "INSERT INTO t SELECT g, g FROM generate_series(1, 500) g")
    take_fence(dbs.target, DnsLikeRouter(), grace=0.1, timeout=5)

    # When the preflight runs
    report = dbs.preflight()

    # Then it fails, naming the target and the statement that lifts its fence
    result = report.get("read_only_fence")
    assert result.status == "fail", format_report(report)
    assert result.details[0].startswith(f"target: database {dbname(dbs.target_dsn)!r} is read-only by default")
    lift = (
        "SET default_transaction_read_only = off; "
        f'ALTER DATABASE "{dbname(dbs.target_dsn)}" RESET default_transaction_read_only;'
    )
    assert lift in result.remedy
    # ...as it must: the parallel copy's sessions cannot write there
    with pytest.raises(Exception, match="read-only transaction"):
        _forward(dbs, "public.t").start()

    # And once lifted as the remedy says, in a new session (read-only from its start), a statement at a time
    # as psql sends them, the check passes
    operator = connect(dbs.target_dsn)
    try:
        for statement in lift.split("; "):
            execute(operator, statement)
    finally:
        operator.close()
    assert dbs.preflight().get("read_only_fence").status == "pass"
