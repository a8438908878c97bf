"""The rds-proxy router keeps the application's proxy, and its secret (the source's login), when it points it at
the target: preflight tries that login on the target (real servers, password authentication)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lambdas.core.db import connect, execute
from lambdas.core.endpoints import with_login_of
from lambdas.core.preflight import proxy_login_result
from rehearsal.servers import PostgresServer
from tests.conftest import server_pair

PASSWORD = "proxy-Pa55"


def _require_passwords(server: PostgresServer) -> None:
    """The app role must give its password over TCP (the superuser keeps trust, for the fixtures)."""
    hba = Path(server.directory) / "data" / "pg_hba.conf"
    hba.write_text("host all app 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    conn = connect(server.dsn("postgres"))
    try:
        execute(conn, "SELECT pg_reload_conf()")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair("proxy-login") as (source, target):
        for server in (source, target):
            _require_passwords(server)
        yield source, target


def _app_role(server: PostgresServer, password: str) -> None:
    conn = connect(server.dsn("postgres"))
    try:
        execute(conn, "DROP ROLE IF EXISTS app")
        execute(conn, "CREATE ROLE app LOGIN PASSWORD %s", (password,))
    finally:
        conn.close()


def _app_dsn(server: PostgresServer, password: str) -> str:
    return f"host=127.0.0.1 port={server.port} dbname=postgres user=app password={password}"


def test_the_source_login_that_works_on_the_target_passes(servers: tuple[PostgresServer, PostgresServer]) -> None:
    # Given the application's user with the same password on both databases
    source, target = servers
    _app_role(source, PASSWORD)
    _app_role(target, PASSWORD)
    # When preflight tries the source's login on the target
    result = proxy_login_result(with_login_of(_app_dsn(target, "unused"), _app_dsn(source, PASSWORD)))
    # Then it passes
    assert result.status == "pass", result


def test_a_source_login_the_target_refuses_fails_without_showing_the_password(
    servers: tuple[PostgresServer, PostgresServer],
) -> None:
    # Given the application's user with another password on the target
    source, target = servers
    _app_role(source, PASSWORD)
    _app_role(target, "another-one")
    # When preflight tries the source's login on the target
    result = proxy_login_result(with_login_of(_app_dsn(target, "another-one"), _app_dsn(source, PASSWORD)))
    # Then it fails, saying what the cutover would meet, and names the user, never the password
    assert result.status == "fail"
    assert 'password authentication failed for user "app"' in result.details[0]
    assert PASSWORD not in repr(result) and "another-one" not in repr(result)
