"""Small pure pieces: LSNs, table selection, DSN redaction, endpoints."""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from psycopg2.extensions import parse_dsn

from lambdas.core.config import Endpoint
from lambdas.core.db import (
    DatabaseUnreachable,
    InvalidDsn,
    connection_lost,
    redact_dsn,
    when_reachable,
    with_unbounded_session,
)
from lambdas.core.endpoints import EndpointError, resolve_dsn
from lambdas.core.lsn import Lsn
from lambdas.core.tables import TableName, select_tables, unmatched_patterns


def test_lsn_parses_orders_and_subtracts() -> None:
    a, b = Lsn.parse("0/16B3748"), Lsn.parse("1/0")
    assert a < b
    assert b - a == (1 << 32) - 0x16B3748
    assert str(Lsn.parse("16/B374D848")) == "16/B374D848"
    with pytest.raises(ValueError, match="not an LSN"):
        Lsn.parse("garbage")


def test_select_tables_applies_include_then_exclude() -> None:
    tables = [TableName("public", n) for n in ("orders", "orders_archive", "tmp_x", "customers")] + [
        TableName("sales", "a")
    ]
    chosen = select_tables(tables, ["public.*", "sales.a"], ["public.*_archive", "public.tmp_*"])
    assert [str(t) for t in chosen] == ["public.customers", "public.orders", "sales.a"]
    assert unmatched_patterns(tables, ["public.orders", "billing.*"]) == ["billing.*"]


def test_redact_dsn_hides_passwords_in_both_forms() -> None:
    assert "hunter2" not in redact_dsn("host=x password=hunter2 user=u")
    assert "hunter2" not in redact_dsn("host=x password='hun ter2' user=u").replace("***", "")
    assert redact_dsn("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"


class FakeSecrets:
    def __init__(self, payload: str) -> None:
        self.payload = payload
        self.asked: list[str] = []

    def get_secret_value(self, *, SecretId: str) -> dict[str, Any]:
        self.asked.append(SecretId)
        return {"SecretString": self.payload}


ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:src-AbC"


def test_secret_endpoint_becomes_a_tls_dsn() -> None:
    endpoint = Endpoint(secret_arn=ARN, host="db.internal", database="shop")
    secrets = FakeSecrets(json.dumps({"username": "app", "password": "p@ss word"}))
    dsn = resolve_dsn(endpoint, secrets)
    assert secrets.asked == [ARN]
    assert "sslmode=require" in dsn and "host=db.internal" in dsn and "dbname=shop" in dsn


def test_malformed_secret_is_named_without_its_content() -> None:
    endpoint = Endpoint(secret_arn=ARN, host="db.internal", database="shop")
    with pytest.raises(EndpointError, match="username") as info:
        resolve_dsn(endpoint, FakeSecrets('{"user": "app", "pw": "topsecret"}'))
    assert "topsecret" not in str(info.value)


def test_a_login_is_moved_to_another_server_and_database_and_nothing_else() -> None:
    from psycopg2.extensions import parse_dsn

    from lambdas.core.endpoints import with_login_of

    # Given the target's DSN and the source's (another user and password)
    target = "host=tgt.internal port=5433 dbname=shop user=admin password=x sslmode=require"
    source = "host=src.internal port=5432 dbname=shop_old user=app password='p w'"
    # When the source's login is put on the target
    moved = parse_dsn(with_login_of(target, source))
    # Then the server, database and TLS are the target's; user and password the source's
    assert moved == {
        "host": "tgt.internal",
        "port": "5433",
        "dbname": "shop",
        "sslmode": "require",
        "user": "app",
        "password": "p w",
    }


def test_redact_dsn_hides_a_uri_password_with_no_user_and_an_escaped_space() -> None:
    # Given two forms libpq accepts: a URI whose user is empty (the OS user), an unquoted value escaping a space
    no_user = redact_dsn("postgresql://:S3cr3t-Canary-91@db.internal:5432/shop")
    escaped = redact_dsn(r"host=db password=S3cr3t\ Canary-91 user=app")
    # Then no part of either password is shown, and what follows the password stays
    assert "Canary-91" not in no_user and no_user.endswith("@db.internal:5432/shop")
    assert "Canary-91" not in escaped and escaped.endswith("user=app")


def test_a_subscriptions_conninfo_lifts_the_servers_timeouts_and_keeps_everything_else() -> None:
    # Given DSNs in both forms, one with options of its own and a password holding a space and a quote
    lifted = "-c statement_timeout=0 -c idle_in_transaction_session_timeout=0"
    plain = parse_dsn(with_unbounded_session("host=db port=5432 dbname=shop user=app password='p w\\'x'"))
    uri = parse_dsn(with_unbounded_session("postgresql://app:s3cret@db:5432/shop?sslmode=require"))
    own = parse_dsn(with_unbounded_session("host=db dbname=shop options='-c search_path=app'"))
    # Then each gains the options, and keeps every other parameter exactly
    assert plain == {
        "host": "db",
        "port": "5432",
        "dbname": "shop",
        "user": "app",
        "password": "p w'x",
        "options": lifted,
    }
    assert uri["password"] == "s3cret" and uri["sslmode"] == "require" and uri["options"] == lifted
    assert own["options"] == f"-c search_path=app {lifted}"


def test_an_unparsable_dsn_given_for_a_subscription_is_an_error_that_shows_no_part_of_it() -> None:
    with pytest.raises(InvalidDsn) as raised:
        with_unbounded_session("host=db password=Canary-7 x")
    assert "Canary" not in str(raised.value)


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg2.OperationalError("server closed the connection unexpectedly"), True),  # no SQLSTATE
        (psycopg2.DatabaseError("server closed the connection unexpectedly"), True),  # so in a COPY
        (psycopg2.errors.BadCopyFileFormat(), False),  # a DatabaseError too: the stream's fault
        (psycopg2.errors.AdminShutdown(), True),  # 57P01: shut down
        (psycopg2.errors.CrashShutdown(), True),  # 57P02: another backend crashed
        (psycopg2.errors.CannotConnectNow(), True),  # 57P03: starting up
        (psycopg2.errors.ConnectionFailure(), False),  # 08006 from the server: the statement's own connection failed
        (psycopg2.InterfaceError("connection already closed"), True),
        (DatabaseUnreachable("cannot connect to host=db"), True),
        (psycopg2.errors.LockNotAvailable(), False),  # an OperationalError too, but the statement's own failure
        (psycopg2.errors.QueryCanceled(), False),
        (psycopg2.errors.ReadOnlySqlTransaction(), False),
        (RuntimeError("server closed the connection unexpectedly"), False),
    ],
)
def test_a_server_going_away_is_told_from_a_statement_failing(error: BaseException, lost: bool) -> None:
    # Given an error a step raised; Then it counts as the connection lost (a retry gets past it) only when it is
    assert connection_lost(error) is lost


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_session_is_opened_again_once_the_server_answers_within_the_wait_and_not_after_it() -> None:
    # Given a server that refuses connections for 3 s (a restart), and a clock that sleeping moves
    clock = _Clock()

    def open_session() -> str:
        if clock.now < 3:
            raise DatabaseUnreachable("cannot connect to host=db: Connection refused")
        return "session"

    # Then a wait of 10 s gets the session once it answers; a wait of 2 s raises the last refusal
    assert when_reachable(open_session, 10, clock=clock, sleep=clock.sleep) == "session"
    assert clock.now == 3
    clock.now = -3  # a server refusing for 6 s from now
    with pytest.raises(DatabaseUnreachable):
        when_reachable(open_session, 2, clock=clock, sleep=clock.sleep)
    assert clock.now == 0  # tried 0, 1, 2 and 3 s in: the one past the 2 s failed, and its error stands


def test_a_wait_for_a_server_stops_at_once_for_another_error_or_when_told() -> None:
    # Given a session that fails for a reason other than a lost connection, and one told to stop waiting
    clock = _Clock()

    def refused() -> str:
        raise psycopg2.errors.InvalidPassword("password authentication failed")

    def unreachable() -> str:
        raise DatabaseUnreachable("cannot connect")

    # Then neither waits
    with pytest.raises(psycopg2.errors.InvalidPassword):
        when_reachable(refused, 60, clock=clock, sleep=clock.sleep)
    with pytest.raises(DatabaseUnreachable):
        when_reachable(unreachable, 60, stop=lambda: True, clock=clock, sleep=clock.sleep)
    assert clock.now == 0
