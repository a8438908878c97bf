"""The pgbouncer router against a real pgbouncer in front of two real servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from cutover_env import server_port, until

from lambdas.core.db import DatabaseUnreachable, connect, execute, fetch_value
from lambdas.core.routers.base import RouterError, Side
from lambdas.core.routers.pgbouncer import PgbouncerBackend, PgbouncerRouter
from rehearsal.pgbouncer import LocalBackend, PgbouncerProcess, start_pgbouncer
from rehearsal.servers import PostgresServer


@pytest.fixture
def bouncer(pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[PgbouncerProcess, PgbouncerRouter]]:
    source, target = pg_pair
    pgb = start_pgbouncer(
        {"app": LocalBackend(source, "postgres"), "app_ro": LocalBackend(source, "postgres")},
        settings={"default_pool_size": "10"},
    )
    router = PgbouncerRouter(
        pgb.admin_dsn(),
        pgb.config_path,
        writer_alias="app",
        reader_alias="app_ro",
        source=PgbouncerBackend.parse(pgb.backend(source, "postgres")),
        target=PgbouncerBackend.parse(pgb.backend(target, "postgres")),
    )
    try:
        yield pgb, router
    finally:
        pgb.stop()


def test_held_clients_wait_and_continue_on_the_new_writer(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter], pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    pgb, router = bouncer
    source, target = pg_pair
    # Given a client connected through pgbouncer, its transactions on the source
    early = connect(pgb.dsn("app"))
    assert fetch_value(early, "SELECT current_setting('port')::int") == source.port
    # When the router holds its clients, and a client starts a query meanwhile
    hold = router.begin_hold()
    until(hold.done, 5, "the hold")
    assert router.state().holding
    answers: dict[str, object] = {}

    def query() -> None:
        started = time.monotonic()
        try:
            answers["port"] = fetch_value(early, "SELECT current_setting('port')::int")
        except psycopg2.Error as exc:
            answers["error"] = exc
        answers["waited"] = time.monotonic() - started

    waiting = threading.Thread(target=query)
    waiting.start()
    time.sleep(0.4)
    # Then it waits instead of failing
    assert waiting.is_alive() and not answers
    # And when the writer is switched and the clients are released, it continues - on the target
    router.switch_writer(Side.TARGET)
    router.release()
    waiting.join(5)
    assert "error" not in answers
    assert answers["port"] == target.port and float(answers["waited"]) >= 0.4  # type: ignore[arg-type]
    assert router.state().writer is Side.TARGET and not router.state().holding
    # And every operation can be repeated without effect
    router.switch_writer(Side.TARGET)
    router.release()
    assert server_port(pgb.dsn("app")) == target.port
    early.close()


def test_reads_shift_by_weighted_host_lists(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter], pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    pgb, router = bouncer
    source, target = pg_pair

    def ports_of_new_server_connections(n: int) -> list[int]:
        # Each client keeps a transaction open, so each needs a server connection of its own.
        clients = [connect(pgb.dsn("app_ro"), autocommit=False) for _ in range(n)]
        try:
            return [int(fetch_value(c, "SELECT current_setting('port')")) for c in clients]
        finally:
            for c in clients:
                c.close()

    # Given reads on the source
    assert set(ports_of_new_server_connections(4)) == {source.port}
    # When half of them shift to the target
    router.set_read_weight(50)
    # Then new server connections alternate between the two, and the writer did not move
    ports = ports_of_new_server_connections(6)
    assert ports.count(source.port) == 3 and ports.count(target.port) == 3
    assert router.state().read_weight == 50 and router.state().writer is Side.SOURCE
    # And at 100 every read goes to the target
    router.set_read_weight(100)
    assert set(ports_of_new_server_connections(4)) == {target.port}
    assert router.state().read_weight == 100


def test_a_hold_that_cannot_complete_is_cancelled_and_clients_go_on(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter],
) -> None:
    pgb, router = bouncer
    # Given a client in the middle of a transaction through pgbouncer
    busy = connect(pgb.dsn("app"), autocommit=False)
    fetch_value(busy, "SELECT 1")
    # When a hold begins, it cannot complete while that transaction runs
    hold = router.begin_hold()
    time.sleep(0.3)
    assert not hold.done()
    assert "transactions running through pgbouncer" in hold.describe()
    # And when it is cancelled, other clients are served again at once
    hold.cancel()
    assert not router.state().holding
    other = connect(pgb.dsn("app"))
    assert fetch_value(other, "SELECT 1") == 1
    busy.commit()
    for conn in (busy, other):
        conn.close()


def test_only_its_own_alias_lines_are_rewritten(bouncer: tuple[PgbouncerProcess, PgbouncerRouter]) -> None:
    pgb, router = bouncer
    # Given a config file with comments and other settings
    before = pgb.config_path.read_text()
    # When the writer moves and back
    router.switch_writer(Side.TARGET)
    moved = pgb.config_path.read_text()
    router.switch_writer(Side.SOURCE)
    # Then only the writer's line changed, and returning restores the file byte for byte
    changed = [(a, b) for a, b in zip(before.splitlines(), moved.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("app = ")
    assert pgb.config_path.read_text() == before
    assert Path(pgb.config_path).stat().st_mode & 0o777 == 0o644


def test_session_pooling_is_refused_before_anything_is_held(pg_pair: tuple[PostgresServer, PostgresServer]) -> None:
    source, target = pg_pair
    pgb = start_pgbouncer({"app": LocalBackend(source, "postgres")}, settings={"pool_mode": "session"})
    try:
        router = PgbouncerRouter(
            pgb.admin_dsn(),
            pgb.config_path,
            writer_alias="app",
            source=PgbouncerBackend.parse(pgb.backend(source, "postgres")),
            target=PgbouncerBackend.parse(pgb.backend(target, "postgres")),
        )
        with pytest.raises(RouterError, match="session pooling"):
            router.begin_hold()
        assert not router.state().holding
        # And an unknown alias is named
        with pytest.raises(RouterError, match="no \\[databases\\] line for nope"):
            PgbouncerRouter(
                pgb.admin_dsn(),
                pgb.config_path,
                writer_alias="nope",
                source=PgbouncerBackend.parse(pgb.backend(source, "postgres")),
                target=PgbouncerBackend.parse(pgb.backend(target, "postgres")),
            ).switch_writer(Side.TARGET)
    finally:
        pgb.stop()


def test_the_admin_password_never_appears_in_errors(pg_pair: tuple[PostgresServer, PostgresServer]) -> None:
    source, target = pg_pair
    # Given an admin DSN with a password and nothing listening there
    router = PgbouncerRouter(
        "host=127.0.0.1 port=1 dbname=pgbouncer user=postgres password=s3cret-admin",
        "/nonexistent/pgbouncer.ini",
        writer_alias="app",
        source=PgbouncerBackend("127.0.0.1", source.port, "postgres"),
        target=PgbouncerBackend("127.0.0.1", target.port, "postgres"),
    )
    # When it is used / Then the error names the place, not the password
    with pytest.raises(Exception) as caught:
        router.state()
    assert "s3cret" not in str(caught.value) and "127.0.0.1" in str(caught.value)
    with pytest.raises(Exception) as caught:
        router.begin_hold()
    assert "s3cret" not in str(caught.value)


def test_writes_held_at_pgbouncer_are_not_lost(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter], pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    pgb, router = bouncer
    source, _ = pg_pair
    admin = connect(source.dsn())
    execute(admin, "CREATE TABLE IF NOT EXISTS held_writes (n int)")
    execute(admin, "TRUNCATE held_writes")
    # Given an alias in use (pgbouncer greets new clients with the server parameters it learnt
    # from its first server login; a pool that never logged in cannot greet anyone while paused)
    warm = connect(pgb.dsn("app"))
    warm.close()
    # And a hold in place
    hold = router.begin_hold()
    until(hold.done, 5, "the hold")
    # When ten clients write meanwhile, and the hold is released
    errors: list[Exception] = []

    def write(n: int) -> None:
        try:
            conn = connect(pgb.dsn("app"))
            execute(conn, "INSERT INTO held_writes VALUES (%s)", (n,))
            conn.close()
        except Exception as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert fetch_value(admin, "SELECT count(*) FROM held_writes") == 0
    router.release()
    for t in threads:
        t.join(5)
    # Then every write arrived
    assert not errors
    assert fetch_value(admin, "SELECT count(*) FROM held_writes") == 10
    execute(admin, "DROP TABLE held_writes")
    admin.close()


def test_a_read_shift_that_an_include_overrides_is_an_error_not_a_success(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter], pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    # Given a pgbouncer.ini whose %include (later in the file) defines the reader alias again
    pgb, router = bouncer
    source, _ = pg_pair
    extra = pgb.directory / "extra.ini"
    extra.write_text(f"[databases]\napp_ro = {pgb.backend(source, 'postgres')}\n")
    extra.chmod(0o644)
    pgb.config_path.write_text(pgb.config_path.read_text().replace("\n[pgbouncer]", f"%include {extra}\n\n[pgbouncer]"))
    # When every read is to move to the target / Then it fails saying why (once: it returned, reads stayed)
    with pytest.raises(RouterError, match="still routes 'app_ro' elsewhere after RELOAD"):
        router.set_read_weight(100)
    assert router.state().read_weight == 0


def test_a_switch_waits_for_a_restarting_pgbouncer_and_lands_on_the_new_writer(
    bouncer: tuple[PgbouncerProcess, PgbouncerRouter], pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    pgb, router = bouncer
    _, target = pg_pair
    waiting = PgbouncerRouter(
        pgb.admin_dsn(),
        pgb.config_path,
        writer_alias="app",
        reader_alias="app_ro",
        source=router.backend(Side.SOURCE),
        target=router.backend(Side.TARGET),
        reconnect_seconds=10,
    )
    # Given pgbouncer crashed (SIGKILL) and starts again 1.2 s later, as a supervisor would restart it
    pgb.kill()
    assert not pgb.is_running()
    # Then a router that does not wait fails at once, saying it cannot connect
    with pytest.raises(DatabaseUnreachable, match="cannot connect"):
        router.switch_writer(Side.TARGET)
    starting: list[float] = []
    listening: list[float] = []

    def restart() -> None:
        time.sleep(1.2)  # between two polls of a router that polled each second, so that one would land late
        starting.append(time.monotonic())
        pgb.restart()
        listening.append(time.monotonic())

    supervisor = threading.Thread(target=restart)
    supervisor.start()
    # When the waiting router switches the writer meanwhile
    waiting.switch_writer(Side.TARGET)
    switched = time.monotonic()
    supervisor.join(10)
    # Then the switch happened once pgbouncer answered again, within a fraction of a second of its listening
    # (polled each 0.1 s), and clients now reach the target through it
    assert starting and listening and starting[0] <= switched and switched - listening[0] < 0.5
    assert waiting.state().writer is Side.TARGET
    assert server_port(pgb.dsn("app")) == target.port
