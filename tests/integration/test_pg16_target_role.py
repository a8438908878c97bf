"""PostgreSQL 16 lets a role that is no superuser create subscriptions (pg_create_subscription): preflight
names every grant such a target role lacks, and with them the logical engine copies, streams and waits for
a position as that role, and the cutover and its rollback run, from a PostgreSQL 16 source and from a 15 one
(a major-version upgrade). Real PostgreSQL 16 servers: binaries from the pgserver wheel (Debian 12 packages
only 15)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from lambdas.core.config import Cutover, LogicalSettings, parse_migration
from lambdas.core.cutover import CutoverPlan, CutoverRunner
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.lsn import applied_lsn, current_lsn, wait_for_lsn
from lambdas.core.preflight import LocalDiskProbe, PreflightReport, run_preflight
from lambdas.core.tables import TableName
from rehearsal.servers import PostgresServer, start_server
from tests.conftest import server_pair
from tests.integration.cutover_env import pgbouncer_router, quick_worker_starts
from tests.integration.pg16_env import pg16_bindir
from tests.integration.secret_env import PASSWORD, app_dsn, secure

ROLE = "migrator"
TABLES = (TableName("public", "items"), TableName("public", "events"))
DDL = (
    "CREATE TABLE items (id bigint PRIMARY KEY, v text);"
    " CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), item bigint, at timestamptz DEFAULT now());"
)
GRANT_SET = f"GRANT SET ON PARAMETER session_replication_role TO {ROLE}"
GRANT_ORIGIN = f"GRANT EXECUTE ON FUNCTION pg_replication_origin_progress(text, boolean) TO {ROLE}"


@pytest.fixture(scope="module")
def pg16() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A PostgreSQL 16 source and target that require passwords (a subscription owned by a role that is no
    superuser must log in to the source with one), with database shop on both."""
    with server_pair("pg16", bindir=pg16_bindir()) as (source, target):
        for server in (source, target):
            secure(server)
            server.create_database("shop")
        yield source, target


def source_dsn(source: PostgresServer, db: str = "shop") -> str:
    return app_dsn(source, db)  # the superuser app, with its password


def role_dsn(target: PostgresServer, db: str = "shop", role: str = ROLE) -> str:
    return f"host=127.0.0.1 port={target.port} dbname={db} user={role} password={PASSWORD}"


def preflight(src_dsn: str, tgt_dsn: str, **extra: Any) -> PreflightReport:
    migration = parse_migration({"name": "t", "source": {"dsn": src_dsn}, "target": {"dsn": tgt_dsn}, **extra})
    with closing(connect(src_dsn)) as src, closing(connect(tgt_dsn)) as tgt:
        return run_preflight(src, tgt, migration, disk_probe=LocalDiskProbe(), wal_rate_sample_seconds=0.2)


def test_a_target_role_in_pg_create_subscription_is_told_each_grant_and_then_migrates(
    pg16: tuple[PostgresServer, PostgresServer],
) -> None:
    # Given PostgreSQL 16, rows on the source, and the target's tables owned by a role that is no superuser
    # but may create subscriptions (pg_create_subscription, CREATE on the database)
    source, target = pg16
    target.psql(
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; GRANT pg_create_subscription TO {ROLE};"
        f" GRANT CREATE ON DATABASE shop TO {ROLE}"
    )
    target.psql(f"GRANT CREATE ON SCHEMA public TO {ROLE}", "shop")
    src = connect(source_dsn(source))
    assert str(fetch_value(src, "SHOW server_version_num")).startswith("16")
    execute(src, DDL)
    execute(src, "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3000) g;")
    execute(src, "INSERT INTO events (item) SELECT g FROM generate_series(1, 3000) g")
    tgt = connect(role_dsn(target))
    execute(tgt, DDL)
    try:
        # When preflight runs (the default copy: parallel-snapshot)
        report = preflight(source_dsn(source), role_dsn(target))
        # Then the role may create the subscription, but not write as session_replication_role = replica as
        # the parallel copy does: it fails, naming the grant; and reading how far the subscription applied
        # is only warned about, with its grant
        role_check = report.get("target_role")
        assert role_check.status == "fail", role_check
        assert f"GRANT SET ON PARAMETER session_replication_role TO {ROLE};" in role_check.remedy
        position = report.get("apply_position_rights")
        assert position.status == "warn", position
        assert f"On the target, in database shop, as a superuser run: {GRANT_ORIGIN};" in position.remedy
        # When the first grant is run as the remedy says
        target.psql(GRANT_SET)
        # Then the role check passes
        assert preflight(source_dsn(source), role_dsn(target)).get("target_role").status == "pass"
        # And the logical engine copies every row as that role, and streams what comes next
        plan = LogicalReplicationPlan(
            ReplicationNames("zdm_pg16"), TABLES, LogicalSettings.model_validate({"copy_workers": 2})
        )
        started = LogicalEngine(source_dsn(source), role_dsn(target), plan).start()
        assert started.rows_copied == 6000
        execute(src, "INSERT INTO items SELECT g, 'late' FROM generate_series(3001, 3100) g")
        # And a wait for the source's position ends without reading the origin (the apply worker's received
        # position or the walsender's report decides)
        reached = wait_for_lsn(
            tgt, "zdm_pg16", current_lsn(src), timeout=30, source=src, slot=plan.names.slot, max_poll_interval=0.05
        )
        assert reached.signal in ("received", "walsender")
        assert fetch_value(tgt, "SELECT count(*) FROM items") == 3100
        assert applied_lsn(tgt, "zdm_pg16") is None  # not readable: no error
        # When the second grant is run (in the database: functions' rights are the database's own)
        target.psql(GRANT_ORIGIN, "shop")
        # Then preflight warns of nothing more about the role, and waits read the origin again
        assert preflight(source_dsn(source), role_dsn(target)).get("apply_position_rights").status == "pass"
        execute(src, "UPDATE items SET v = 'again' WHERE id <= 10")
        again = wait_for_lsn(tgt, "zdm_pg16", current_lsn(src), timeout=30, max_poll_interval=0.05)
        assert again.signal in ("origin", "received")
        assert fetch_value(tgt, "SELECT count(*) FROM items WHERE v = 'again'") == 10
        origin = applied_lsn(tgt, "zdm_pg16")
        assert origin is not None and origin >= reached.reached_lsn
    finally:
        tgt.close()
        src.close()


@pytest.fixture(scope="module")
def pg15_source() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 source that requires passwords: the other side of a major-version upgrade."""
    server = start_server("pg15-source")
    try:
        secure(server)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("source_version", ["16", "15"])
def test_with_the_grants_preflight_names_such_a_role_is_cut_over_and_rolled_back(
    pg16: tuple[PostgresServer, PostgresServer], source_version: str, request: pytest.FixtureRequest
) -> None:
    # Given a PostgreSQL 16 target role that is no superuser, granted what preflight's role checks name
    # (pg_create_subscription, REPLICATION and pg_signal_backend, the database's ownership, SET
    # session_replication_role, EXECUTE on pg_replication_origin_progress), tables with a sequence, and a
    # PostgreSQL 16 source, or a 15 one (a major-version upgrade)
    source = pg16[0] if source_version == "16" else request.getfixturevalue("pg15_source")
    target = pg16[1]
    role, db = f"cutter{source_version}", f"cut{source_version}"
    for server in (source, target):
        server.create_database(db)
        quick_worker_starts(server)
    target.psql(
        f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}'; GRANT pg_create_subscription, pg_signal_backend"
        f" TO {role}; ALTER DATABASE {db} OWNER TO {role}; GRANT SET ON PARAMETER session_replication_role TO {role}"
    )
    target.psql(f"{GRANT_ORIGIN.replace(ROLE, role)}; GRANT CREATE ON SCHEMA public TO {role}", db)
    src_dsn, tgt_dsn = source_dsn(source, db), role_dsn(target, db, role)
    tables = (TableName("public", "items"), TableName("public", "orders"))
    ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v text); CREATE TABLE orders (id bigserial PRIMARY KEY, v text);"
    src, tgt = connect(src_dsn), connect(tgt_dsn)
    execute(src, ddl + " INSERT INTO items SELECT g, 'v' FROM generate_series(1, 2000) g;")
    execute(src, "INSERT INTO orders (v) SELECT 'o' FROM generate_series(1, 500)")
    execute(tgt, ddl)
    assert str(fetch_value(src, "SHOW server_version_num")).startswith(source_version)
    report = preflight(src_dsn, tgt_dsn)
    assert {n: report.get(n).status for n in ("target_role", "apply_position_rights", "cutover_rights")} == {
        "target_role": "pass",
        "apply_position_rights": "pass",
        "cutover_rights": "pass",
    }
    pgb, router = pgbouncer_router(source, target, db)
    try:
        forward, back = ReplicationNames(f"zdm_{db}"), ReplicationNames(f"zdm_{db}_rev")
        LogicalEngine(
            src_dsn, tgt_dsn, LogicalReplicationPlan(forward, tables, LogicalSettings(copy_workers=2))
        ).start()
        wait_for_lsn(tgt, forward.subscription, current_lsn(src), timeout=30, source=src, slot=forward.slot)
        plan = CutoverPlan(db, tables, forward, back, Cutover(), LogicalSettings(copy_workers=2), 64 << 20)
        src.close()  # the fences end other sessions
        tgt.close()
        # When the writer is cut over to the target, an order is taken there, and the cutover is rolled back
        done = CutoverRunner(src_dsn, tgt_dsn, router, plan).cutover()
        app = connect(pgb.dsn("app"))
        new_order = fetch_value(app, "INSERT INTO orders (v) VALUES ('on the target') RETURNING id")
        app.close()
        back_done = CutoverRunner(src_dsn, tgt_dsn, router, plan).rollback()
        # Then both ended, the target's sequence had moved past the source's, and the order taken on the
        # target came back to the source through the replication back
        assert (done.status, back_done.status) == ("done", "done")
        assert new_order > 500
        src = connect(src_dsn)
        assert fetch_value(src, "SELECT v FROM orders WHERE id = %s", (new_order,)) == "on the target"
        assert fetch_value(src, "SELECT count(*) FROM orders") == 501
    finally:
        pgb.stop()
        src.close()
        tgt.close()


def test_the_change_stream_applier_runs_as_such_a_role_granted_session_replication_role(
    pg16: tuple[PostgresServer, PostgresServer],
) -> None:
    # Given a PostgreSQL 16 target role that is no superuser, with CREATE on the database (the applier's
    # state schema) and the right to SET session_replication_role, the one preflight names for debezium
    from lambdas.core.changestream import state
    from lambdas.core.changestream.applier import ChangeApplier
    from lambdas.core.changestream.target import StreamRouting
    from tests.integration.test_changestream_applier import PREFIX, TOPIC, CollectingSink, Stream, item, open_target

    source, target = pg16
    role, db = "applier", "dbz"
    target.create_database(db)
    target.psql(
        f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; GRANT CREATE ON DATABASE {db} TO {role};"
        f" GRANT SET ON PARAMETER session_replication_role TO {role}"
    )
    target.psql(f"GRANT CREATE ON SCHEMA public TO {role}", db)
    dsn = role_dsn(target, db, role)
    conn = open_target(dsn)
    try:
        report = preflight(source_dsn(source), dsn, engine={"type": "debezium"})
        assert report.get("target_role").status == "pass", report.get("target_role")
        # When a batch of snapshot reads, creates, an update and a delete is applied as that role
        s = Stream()
        batch = [
            s.read(item(1)),
            s.read(item(2)),
            s.create(item(3, qty=3), (1000, 1010)),
            s.update(item(1, qty=5), (1100, 1110)),
            *s.delete(2, (1200, 1210)),
        ]
        applier = ChangeApplier(
            conn, StreamRouting.load(conn, PREFIX, [TableName("public", "items")]), CollectingSink()
        )
        result = applier.apply(batch)
        # Then every change is applied, nothing is a dead letter, and the offsets are stored
        assert (result.applied, result.tombstones, result.dead_letters) == (5, 1, [])
        with conn.cursor() as cur:
            cur.execute("SELECT id, qty FROM items ORDER BY id")
            assert cur.fetchall() == [(1, 5), (3, 3)]
        assert state.stored_offsets(conn, [TOPIC]) == {(TOPIC, 0): len(batch)}
    finally:
        conn.close()
