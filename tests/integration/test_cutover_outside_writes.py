"""Writes that do not come from a client session of the old writer: the fence must account for them.

- a two-phase transaction prepared before the fence: it has no session to end, and COMMIT PREPARED
  is allowed in a read-only transaction, so it could commit on the old side after the fence position;
- a subscription feeding the source from another system: its apply worker is no client session and
  ignores the read-only default, so it would go on committing after the fence;
- a write reaching the target before the cutover (the read shift sends reader traffic there): it
  would never travel back to the source, so a rollback would lose it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from cutover_env import Shop, clean_up, read_only_error, shop_in, start_shop, until

from lambdas.core.cutover import CutoverError
from lambdas.core.cutover.readshift import shift_reads
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.fence import is_fenced, make_writable
from lambdas.core.preflight.facts import ServerFacts, gather_server
from lambdas.core.routers.base import Side
from rehearsal.servers import PostgresServer
from tests.conftest import server_pair

QUICK_FENCE = {"fence_grace_seconds": 0.2, "fence_timeout_seconds": 1.0}


def count(dsn: str, query: str, *params: object) -> int:
    conn = connect(dsn)
    try:
        return int(fetch_value(conn, query, params or None))
    finally:
        conn.close()


def server_facts(dsn: str) -> ServerFacts:
    conn = connect(dsn)
    try:
        return gather_server(conn)
    finally:
        conn.close()


def fenced(dsn: str) -> bool:
    conn = connect(dsn)
    try:
        return is_fenced(conn)
    finally:
        conn.close()


# -- prepared transactions ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_phase_pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair("twophase", {"max_prepared_transactions": "10"}) as pair:
        yield pair


@pytest.fixture
def two_phase_shop(two_phase_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[Shop]:
    source, target = two_phase_pair
    source.create_database("twophase")
    target.create_database("twophase")
    shop = start_shop(source, target, "twophase", rows=2000)
    try:
        yield shop
    finally:
        conn = connect(shop.src)
        try:
            make_writable(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                for (gid,) in cur.fetchall():
                    execute(conn, "ROLLBACK PREPARED %s", (gid,))
        finally:
            conn.close()
        clean_up(shop)
        source.psql('DROP DATABASE IF EXISTS "twophase" WITH (FORCE)')
        target.psql('DROP DATABASE IF EXISTS "twophase" WITH (FORCE)')


def test_a_prepared_transaction_holds_the_fence_until_it_is_resolved_and_then_moves_with_the_writer(
    two_phase_shop: Shop,
) -> None:
    shop = two_phase_shop
    # Given a two-phase transaction (an XA coordinator's branch) prepared on the source
    conn = connect(shop.src, autocommit=False)
    execute(conn, "INSERT INTO customers (email, name) VALUES ('prepared@example.com', 'Prepared')")
    execute(conn, "PREPARE TRANSACTION 'branch-1'")
    conn.close()
    assert server_facts(shop.src).prepared_transactions == 1  # what preflight warns about
    # When the cutover tries to fence writes
    with pytest.raises(CutoverError, match=r"prepared \(two-phase\) transaction.*'branch-1'"):
        shop.runner(**QUICK_FENCE).cutover()
    # Then the attempt is undone: the writer stays on the source, which takes writes again
    assert shop.router.state().writer is Side.SOURCE
    assert not fenced(shop.src)
    assert read_only_error(shop.src) is None
    # And once the coordinator commits its branch, the next attempt carries the row to the target
    commit = connect(shop.src)
    try:
        execute(commit, "COMMIT PREPARED 'branch-1'")
    finally:
        commit.close()
    result = shop.runner(**QUICK_FENCE).cutover()
    assert result.attempt == 2
    assert shop.router.state().writer is Side.TARGET
    assert count(shop.tgt, "SELECT count(*) FROM customers WHERE email = %s", "prepared@example.com") == 1


# -- a source fed by another system ---------------------------------------------------------------


@pytest.fixture
def shop(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    with shop_in(pg_pair, fresh_dbs) as s:
        yield s


@pytest.fixture
def upstream_subscription(shop: Shop, pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[str]:
    """A subscription on the source database fed by another database (on the target server)."""
    _, other = pg_pair
    upstream_db = f"up_{shop.dbname}"
    name = f"up_{shop.dbname}"
    other.create_database(upstream_db)
    up = connect(other.dsn(upstream_db))
    execute(
        up,
        "CREATE TABLE events (id uuid PRIMARY KEY, order_id bigint, kind text NOT NULL, payload jsonb,"
        " at timestamptz NOT NULL DEFAULT now())",
    )
    execute(up, "CREATE PUBLICATION up FOR TABLE events")
    src = connect(shop.src)
    execute(
        src, f"CREATE SUBSCRIPTION {name} CONNECTION '{other.dsn(upstream_db)}' PUBLICATION up WITH (copy_data = false)"
    )
    src.close()
    execute(up, "INSERT INTO events (id, kind) VALUES (gen_random_uuid(), 'upstream')")
    up.close()
    until(lambda: count(shop.src, "SELECT count(*) FROM events WHERE kind = 'upstream'") == 1, 20, "upstream apply")
    try:
        yield name
    finally:
        src = connect(shop.src)
        make_writable(src)
        execute(src, f"ALTER SUBSCRIPTION {name} DISABLE")
        execute(src, f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")
        execute(src, f"DROP SUBSCRIPTION {name}")
        src.close()
        other.psql(f"SELECT pg_drop_replication_slot('{name}')")
        other.psql(f'DROP DATABASE IF EXISTS "{upstream_db}" WITH (FORCE)')


def test_the_fence_refuses_while_another_subscription_writes_into_the_source(
    shop: Shop, upstream_subscription: str
) -> None:
    # Given the source database is itself a subscriber (fed by another system), as preflight sees
    assert server_facts(shop.src).subscriptions == (upstream_subscription,)
    # When the cutover tries to fence writes
    with pytest.raises(CutoverError, match=f"subscription\\(s\\) {upstream_subscription} write into this database"):
        shop.runner(**QUICK_FENCE).cutover()
    # Then nothing changed: the writer is on the source, which is not fenced
    assert shop.router.state().writer is Side.SOURCE
    assert not fenced(shop.src)
    # And once the operator disables that subscription, the cutover goes ahead
    src = connect(shop.src)
    try:
        execute(src, f"ALTER SUBSCRIPTION {upstream_subscription} DISABLE")
    finally:
        src.close()
    shop.runner(**QUICK_FENCE).cutover()
    assert shop.router.state().writer is Side.TARGET
    assert count(shop.tgt, "SELECT count(*) FROM events WHERE kind = 'upstream'") == 1


# -- the target before the cutover ----------------------------------------------------------------


def shift(shop: Shop, percent: int) -> None:
    control = connect(shop.tgt)
    try:
        shift_reads(control, shop.router, "shop", percent, execution_started=None)
    finally:
        control.close()


def test_the_target_refuses_writes_once_reads_move_to_it(shop: Shop) -> None:
    # Given every read on the target (the read shift's last step)
    shift(shop, 100)
    # When a client writes on the target (through the reader alias, or directly)
    through_reader = read_only_error(shop.pgbouncer.dsn("app_ro"))
    direct = read_only_error(shop.tgt)
    # Then both are refused, and reads and replication go on
    assert (through_reader, direct) == ("ReadOnlySqlTransaction", "ReadOnlySqlTransaction")
    assert count(shop.pgbouncer.dsn("app_ro"), "SELECT count(*) FROM customers") > 0
    writer = connect(shop.app)
    try:
        execute(writer, "INSERT INTO events (id, kind) VALUES (gen_random_uuid(), 'during-shift')")
    finally:
        writer.close()
    until(lambda: count(shop.tgt, "SELECT count(*) FROM events WHERE kind = 'during-shift'") == 1, 20, "apply")
    # And a second invocation of the same step changes nothing more
    shift(shop, 100)
    assert fenced(shop.tgt)


@pytest.mark.parametrize("then", ["rollback", "cutover"])
def test_the_target_takes_writes_again_after_a_rollback_or_the_cutover(shop: Shop, then: str) -> None:
    # Given reads moved to the target by the read shift
    shift(shop, 100)
    assert read_only_error(shop.tgt) == "ReadOnlySqlTransaction"
    # When the migration is rolled back before its cutover, or cuts over
    if then == "rollback":
        result = shop.runner().rollback()
        assert result.kind == "before_cutover"
        assert "lift_target_fence" in [s.step for s in result.steps]
    else:
        shop.runner().cutover()
        time.sleep(0.1)
    # Then the target is no longer fenced (a new migration can copy into it, or it is the writer)
    assert not fenced(shop.tgt)
    assert read_only_error(shop.tgt, "INSERT INTO events (id, kind) VALUES (gen_random_uuid(), 'x')") is None
    state = shop.router.state()
    assert state.read_weight == (0 if then == "rollback" else 100)
