"""Shared fixtures. Integration tests get real PostgreSQL servers from rehearsal.servers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lambdas.handlers.runtime import logger
from rehearsal.broker import Broker, start_broker
from rehearsal.servers import PostgresServer, start_server


@contextmanager
def server_pair(
    prefix: str,
    settings: dict[str, str] | None = None,
    bindir: Path | None = None,
    target_bindir: Path | None = None,
) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A source and a target server (`<prefix>-source`, `<prefix>-target`), stopped after; the target from
    `target_bindir` when given (another major version), else both from `bindir` (default: Debian's)."""
    source = start_server(f"{prefix}-source", settings=settings, bindir=bindir)
    try:
        target = start_server(f"{prefix}-target", settings=settings, bindir=target_bindir or bindir)
    except BaseException:
        source.stop()
        raise
    try:
        yield source, target
    finally:
        source.stop()
        target.stop()


@pytest.fixture(scope="session")
def pg_pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A source and a target server for the whole session; tests use their own databases."""
    with server_pair("test") as pair:
        yield pair


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A Kafka-compatible broker (Tansu, memory storage) per test module; tests share it, so each
    change stream uses topic names of its own (stream_env.make_engine(name=...))."""
    b = start_broker()
    try:
        yield b
    finally:
        b.stop()


_db_counter = iter(range(1, 1_000_000))


@pytest.fixture
def fresh_dbs(pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[str, str]]:
    """A new empty database on each server; yields (source_dsn, target_dsn) and drops both after."""
    source, target = pg_pair
    name = f"t{next(_db_counter)}"
    source.create_database(name)
    target.create_database(name)
    try:
        yield source.dsn(name), target.dsn(name)
    finally:
        for server in (target, source):
            server.psql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
        # A subscription owns a slot on the source; drop it first so the source can drop the database.
        _drop_subscriptions(target, name)
        _drop_slots(source, name)
        target.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        source.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_subscriptions(server: PostgresServer, dbname: str) -> None:
    subs = server.psql(
        f"SELECT s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = '{dbname}'"
    )
    for sub in filter(None, subs.splitlines()):
        server.psql(f'ALTER SUBSCRIPTION "{sub}" DISABLE', dbname)
        server.psql(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)', dbname)
        server.psql(f'DROP SUBSCRIPTION "{sub}"', dbname)


def _drop_slots(server: PostgresServer, dbname: str) -> None:
    server.psql(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
        f"WHERE database = '{dbname}' AND active_pid IS NOT NULL"
    )
    import time

    for _ in range(50):
        left = server.psql(f"SELECT count(*) FROM pg_replication_slots WHERE database = '{dbname}' AND active")
        if left == "0":
            break
        time.sleep(0.1)
    server.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{dbname}'")


@pytest.fixture
def handler_logs() -> Iterator[io.StringIO]:
    """What the handlers log: their logger's handler holds the stdout of import time, which no capture
    fixture sees."""
    stream = io.StringIO()
    previous = logger.registered_handler.setStream(stream)
    try:
        yield stream
    finally:
        logger.registered_handler.setStream(previous)  # type: ignore[arg-type]
