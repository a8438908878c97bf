"""Cutover and rollback with the debezium engine carrying source -> target, under writes through pgbouncer.

The cutover waits until the applier has applied everything before the fence (the fence marker
through the connector, then the topics' end offsets against the target's stored offsets), stops
the change stream, starts native reverse replication, and moves the writer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2.extensions
import pytest
from cutover_env import (
    TABLES,
    Shop,
    assert_no_difference,
    clean_up,
    cutover_under_writes,
    longest_gap,
    read_only_error,
    start_shop,
)

from lambdas.core.changestream.runtime import PartState
from lambdas.core.cutover import CutoverAborted, CutoverNotReady, CutoverRunner, Hooks, Operation, Step
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.engines.base import FenceReached
from lambdas.core.engines.debezium import DebeziumEngine
from lambdas.core.fence import Backend
from lambdas.core.routers.base import Side
from rehearsal.broker import Broker
from rehearsal.compare import Snapshot
from rehearsal.servers import PostgresServer
from tests.integration.stream_env import make_engine, wait_until


@pytest.fixture
def streamed_shop(
    pg_pair: tuple[PostgresServer, PostgresServer],
    fresh_dbs: tuple[str, str],
    broker: Broker,
    tmp_path: Path,
) -> Iterator[tuple[Shop, DebeziumEngine]]:
    source, target = pg_pair
    dbname = psycopg2.extensions.parse_dsn(fresh_dbs[0])["dbname"]
    shop = start_shop(source, target, dbname, forward=False)
    engine = make_engine(shop.src, shop.tgt, broker, tmp_path / "stream", TABLES, name=f"cut-{dbname}")
    try:
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        yield shop, engine
    finally:
        engine.teardown()
        clean_up(shop)


def runner(shop: Shop, engine: DebeziumEngine, hooks: Hooks | None = None) -> CutoverRunner:
    return CutoverRunner(shop.src, shop.tgt, shop.router, shop.plan(), hooks=hooks, forward_stream=engine)


def test_cutover_over_the_change_stream_loses_no_write(streamed_shop: tuple[Shop, DebeziumEngine]) -> None:
    # Given the debezium engine streaming and 8 clients writing through pgbouncer
    shop, engine = streamed_shop
    snapshots: dict[str, Snapshot] = {}

    def at_switch(operation: Operation, step: Step) -> None:
        if step is Step.SWITCH_WRITER:  # clients are held: both sides stand still
            snapshots["switch"] = Snapshot.take(shop.src, shop.tgt)

    # When the cutover runs while 8 clients write through pgbouncer
    # Then no transaction failed, every step ran, and the catch-up waited for the fence marker
    result, stats = cutover_under_writes(shop, runner(shop, engine, Hooks(after_record=at_switch)))
    catch_up = next(s for s in result.steps if s.step == Step.CATCH_UP.value)
    print(f"\ncatch up {catch_up.detail}; steps {[(s.step, round(s.seconds * 1000)) for s in result.steps]}")
    # And at the switch both databases held exactly the same rows
    assert assert_no_difference(snapshots["switch"].diffs(TABLES)) > 5_000
    # And writes made on the target since come back to the source by native reverse replication
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
    # And the change stream is gone: connector and applier stopped, its slot dropped from the source
    health = engine.runtime.health()
    assert (health.connector, health.applier) == (PartState.ABSENT, PartState.ABSENT)
    conn = connect(shop.src)
    try:
        assert (
            fetch_value(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (engine.plan.slot,))
            == 0
        )
    finally:
        conn.close()
    assert shop.router.state().writer is Side.TARGET
    print(
        f"\ndebezium cutover: longest write pause {longest_gap(stats) * 1000:.0f} ms, "
        f"fence to release {(result.pause_seconds or 0) * 1000:.0f} ms"
    )


def test_a_cutover_failing_after_the_pause_is_undone_and_the_stream_resumes(
    streamed_shop: tuple[Shop, DebeziumEngine],
) -> None:
    # Given the change stream running, and a cutover whose back replication cannot reach the target
    # (the source is told a dead address for it): it fails after the applier was paused
    shop, engine = streamed_shop
    dead = shop.tgt.replace(f"port={shop.target.port}", "port=1")
    broken = CutoverRunner(shop.src, shop.tgt, shop.router, shop.plan(), target_conninfo=dead, forward_stream=engine)
    with pytest.raises(CutoverAborted, match="start_back_replication") as caught:
        broken.cutover()
    assert "was undone" in str(caught.value)
    # Then clients write to the source again and the stream carries those writes to the target
    assert shop.router.state().writer is Side.SOURCE and not shop.router.state().holding
    assert engine.runtime.health().running
    new_id = _new_customer(shop.app, "late@x")
    wait_until(lambda: _exists(shop.tgt, new_id), 60, "the write after the undone cutover to reach the target", engine)
    # And a new attempt completes, losing nothing
    result = runner(shop, engine).cutover()
    assert result.status == "done" and result.attempt == 2
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def _exists(dsn: str, customer_id: int) -> bool:
    conn = connect(dsn)
    try:
        return bool(fetch_value(conn, "SELECT EXISTS (SELECT 1 FROM customers WHERE id = %s)", (customer_id,)))
    finally:
        conn.close()


def test_the_connectors_sessions_outlive_the_fence_and_end_before_the_marker_so_a_slow_cutover_keeps_the_connector(
    streamed_shop: tuple[Shop, DebeziumEngine],
) -> None:
    # Given the change stream running, and a session under the connector's role that calls itself what Debezium
    # calls its own (as a client could), opened before the cutover
    shop, engine = streamed_shop
    # (a change streamed first: Debezium reads a table's columns through its session at the table's first change)
    first = _new_customer(shop.app, "first@x")
    wait_until(lambda: _exists(shop.tgt, first), 60, "a first change to reach the target", engine)
    posing = connect(shop.src, application_name="Debezium General")
    named: list[Backend] = []
    alive_at_marker: list[int] = []
    logs: list[str] = []
    written: list[int] = []
    own_source_sessions, wait_for_fence = engine.own_source_sessions, engine.wait_for_fence

    def sessions_named(source: psycopg2.extensions.connection) -> list[Backend]:
        named.extend(own_source_sessions(source))
        return named

    def marker_after_the_sessions_ended(source: psycopg2.extensions.connection, timeout: float) -> FenceReached:
        alive_at_marker.extend(_running(shop.src, named))
        # the connector's log up to its sessions' end (a probe after it may still fail it, and does no harm)
        logs.append((engine.runtime.workdir / "connector" / "process.log").read_text(errors="replace"))  # type: ignore[attr-defined]
        return wait_for_fence(source, timeout)

    def after_the_fence(operation: Operation, step: Step) -> None:
        if step is Step.FENCE:
            # The cutover held past several of the connector's heartbeats (1 s apart), as a router down would
            # hold it; meanwhile the posing session, which the fence left alone, commits a write
            time.sleep(3.5)
            written.append(
                fetch_value(posing, "INSERT INTO customers (email, name) VALUES ('posing@x', 'x') RETURNING id")
            )

    engine.own_source_sessions = sessions_named  # type: ignore[method-assign]
    engine.wait_for_fence = marker_after_the_sessions_ended  # type: ignore[method-assign]
    cutover = runner(shop, engine, Hooks(after_record=after_the_fence))
    # When the cutover runs
    result = cutover.cutover()
    fence = next(s for s in result.steps if s.step == Step.FENCE.value)
    catch_up = next(s for s in result.steps if s.step == Step.CATCH_UP.value)
    # Then the fence left the connector's sessions (and the posing one) running, and ended none of them
    left = {s["pid"] for s in fence.detail["stream_sessions"]}
    assert posing.get_backend_pid() in left and len(left) >= 2
    assert not left & {s["pid"] for s in fence.detail["ended_sessions"]}
    # And the catch-up found every one of them still running (the connector had not lost them and restarted),
    # ended them, and wrote its marker only once they were gone
    assert catch_up.detail["stream_sessions_ended"] == len(left)
    assert alive_at_marker == []
    assert len(logs) == 1 and "Going to restart connector" not in logs[0]
    # And the write the posing session committed inside the fence came before the marker: it is on the target
    assert _exists(shop.tgt, written[0])
    with pytest.raises(psycopg2.OperationalError):
        execute(posing, "SELECT 1")
    posing.close()
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def _running(dsn: str, backends: list[Backend]) -> list[int]:
    conn = connect(dsn)
    try:
        return [
            b.pid
            for b in backends
            if fetch_value(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                " AND (extract(epoch FROM backend_start) * 1000000)::bigint = %s",
                (b.pid, b.started_us),
            )
        ]
    finally:
        conn.close()


def _new_customer(dsn: str, email: str) -> int:
    conn = connect(dsn)
    try:
        return int(fetch_value(conn, "INSERT INTO customers (email, name) VALUES (%s, 'x') RETURNING id", (email,)))
    finally:
        conn.close()


def test_a_cutover_waits_for_the_connector_to_read_its_slot_again_before_its_fence(
    streamed_shop: tuple[Shop, DebeziumEngine],
) -> None:
    # Given the connector's walsender ended (its connection lost, as when the source restarts): Debezium waits
    # `restart_wait_ms` (3 s) before it starts streaming again, and meanwhile nothing reads its slot
    shop, engine = streamed_shop
    conn = connect(shop.src)
    try:
        execute(
            conn,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
            (engine.plan.slot,),
        )
    finally:
        conn.close()
    wait_until(lambda: not _slot_read(shop.src, engine.plan.slot), 30, "the slot to lose its reader")
    read_at_fence: list[bool] = []

    def at_the_fence(operation: Operation, step: Step) -> None:
        if step is Step.FENCE:
            read_at_fence.append(_slot_read(shop.src, engine.plan.slot))

    # When a cutover allowed 0.5 s to catch up starts meanwhile
    impatient = CutoverRunner(
        shop.src, shop.tgt, shop.router, shop.plan(catch_up_timeout_seconds=0.5), forward_stream=engine
    )
    # Then it refuses, naming the slot, and changes nothing: no fence, the writer still on the source
    with pytest.raises(CutoverNotReady, match=rf"its slot {engine.plan.slot} had no reader connected"):
        impatient.cutover()
    assert read_at_fence == [] and shop.router.state().writer is Side.SOURCE
    assert read_only_error(shop.src) is None
    # And a cutover with the default 30 s takes its fence only once the connector reads the slot again (the wait
    # comes before the write pause), and completes, losing nothing
    result = runner(shop, engine, Hooks(before_record=at_the_fence)).cutover()
    assert read_at_fence == [True]
    assert result.status == "done"
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def _slot_read(dsn: str, slot: str) -> bool:
    conn = connect(dsn)
    try:
        return bool(fetch_value(conn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)))
    finally:
        conn.close()
