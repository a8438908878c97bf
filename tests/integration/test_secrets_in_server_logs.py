"""The logical engine never puts a password into a server log, pg_stat_statements or an exception (servers
that require passwords, with audit-style logging)."""

from __future__ import annotations

import pytest
from psycopg2.extensions import parse_dsn

from lambdas.core.config import LogicalSettings
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.engines.logical import (
    LogicalEngine,
    LogicalReplicationPlan,
    ReplicationNames,
    _statement_not_logged_on_error,
)
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.servers import PostgresServer, free_port
from tests.integration.secret_env import PASSWORD, LogMark, app_dsn, exc_text, secure_pair

TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)


def _given(source, target, db="shop"):
    for s in (source, target):
        s.create_database(db)
    src, tgt = app_dsn(source, db), app_dsn(target, db)
    for dsn in (src, tgt):
        c = connect(dsn)
        sample.create_schema(c)
        c.close()
    c = connect(src)
    sample.load_data(c, 2000)
    c.close()
    return src, tgt


def _engine(src, tgt, method, conninfo=None):
    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_audit"),
        TABLES,
        LogicalSettings.model_validate({"copy_method": method, "copy_workers": 2}),
    )
    return LogicalEngine(src, tgt, plan, subscription_conninfo=conninfo)


@pytest.mark.parametrize("method", ["subscription", "parallel-snapshot"])
@pytest.mark.parametrize(
    "logging",
    [
        {"log_statement": "ddl"},
        {"log_min_duration_statement": "0"},
        {"shared_preload_libraries": "pgaudit", "pgaudit.log": "ddl"},
        {"shared_preload_libraries": "pgaudit", "pgaudit.log": "all, -misc"},
    ],
    ids=["log_statement=ddl", "log_min_duration_statement=0", "pgaudit.log=ddl", "pgaudit.log=all,-misc"],
)
def test_successful_start_keeps_password_out_of_server_logs(method: str, logging: dict[str, str]) -> None:
    # Given servers that require a password and log DDL / every statement's duration (common audit settings)
    with secure_pair("audit-ddl", settings=logging) as (source, target):
        src, tgt = _given(source, target)
        mark = LogMark(source, target)
        # When the logical engine starts (creates the subscription with the source's DSN)
        result = _engine(src, tgt, method).start()
        # Then it started, and no server log holds the password
        assert not result.already_running
        assert PASSWORD not in mark.text()


@pytest.mark.parametrize("method", ["subscription", "parallel-snapshot"])
@pytest.mark.parametrize(
    "logging",
    [{}, {"shared_preload_libraries": "pgaudit", "pgaudit.log": "ddl"}],
    ids=["defaults", "pgaudit.log=ddl"],
)
def test_failing_create_subscription_keeps_password_out_of_logs_and_errors(
    method: str, logging: dict[str, str]
) -> None:
    # Given servers with default logging (log_min_error_statement = error), or pgaudit logging DDL too,
    # and a subscription conninfo holding the password but pointing at a port nobody listens on
    with secure_pair("audit-fail", settings=logging) as (source, target):
        src, tgt = _given(source, target)
        bad = f"host=127.0.0.1 port={free_port()} dbname=shop user=app password={PASSWORD}"
        mark = LogMark(source, target)
        # When the engine starts and CREATE SUBSCRIPTION fails
        with pytest.raises(Exception) as info:
            _engine(src, tgt, method, conninfo=bad).start()
        # Then neither the error nor a server log holds the password
        assert PASSWORD not in exc_text(info.value)
        assert PASSWORD not in mark.text(), mark.text()


@pytest.mark.parametrize("method", ["subscription", "parallel-snapshot"])
def test_start_keeps_password_out_of_pg_stat_statements(method: str) -> None:
    # Given a target with pg_stat_statements (on by default on RDS and Aurora; utility statements tracked)
    with secure_pair("audit-pgss", settings={"shared_preload_libraries": "pg_stat_statements"}) as (source, target):
        src, tgt = _given(source, target)
        target.psql("CREATE EXTENSION pg_stat_statements", "shop")
        target.psql("SELECT pg_stat_statements_reset()", "shop")  # forget the test's own CREATE ROLE
        # When the logical engine starts
        _engine(src, tgt, method).start()
        # Then no statement text kept by pg_stat_statements (readable by pg_read_all_stats members) holds it
        kept = target.psql("SELECT string_agg(query, E'\\n') FROM pg_stat_statements", "shop")
        assert PASSWORD not in kept, [q for q in kept.splitlines() if PASSWORD in q]


def test_each_logging_setting_the_role_may_change_is_switched_off_even_when_another_is_refused(
    pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]
) -> None:
    # Given a database logging DDL, and a role that may change log_min_error_statement but not log_statement
    _, target_server = pg_pair
    _, target_dsn = fresh_dbs
    db = str(parse_dsn(target_dsn)["dbname"])
    role = "zdm_half_logging"
    target_server.psql(f"CREATE ROLE {role} LOGIN; GRANT SET ON PARAMETER log_min_error_statement TO {role}")
    target_server.psql(f"ALTER DATABASE {db} SET log_statement = 'ddl'")
    conn = connect(target_server.dsn(db, user=role))
    try:

        def shown() -> tuple[str, str]:
            return fetch_value(conn, "SHOW log_min_error_statement"), fetch_value(conn, "SHOW log_statement")

        for in_block in (False, True):
            if in_block:
                execute(conn, "BEGIN")  # as the parallel-snapshot copy creates its subscription
            # When the engine switches statement logging off around a statement
            with _statement_not_logged_on_error(conn):
                # Then the setting it may change is off, the refused one stays as configured
                assert shown() == ("panic", "ddl")
                # ... and a refusal inside a transaction block did not abort it
                assert fetch_value(conn, "SELECT 1") == 1
            # And afterwards both are as they were
            assert shown() == ("error", "ddl")
            if in_block:
                execute(conn, "COMMIT")
    finally:
        conn.close()
        target_server.psql(f"ALTER DATABASE {db} RESET log_statement")
        target_server.psql(f"REVOKE SET ON PARAMETER log_min_error_statement FROM {role}; DROP ROLE {role}")
