"""Apply: the debezium engine's change stream against native logical replication, same workload, same run.

    python -m bench.apply [--events N] [--rows R] [--batch-size B] [--batch-window S] [--appliers A] [--json]

One source and two targets (one server each) hold the sample shop (rehearsal/sample.py, R rows
on the source, schema only on the targets). Both pipelines copy the initial rows first and are
caught up before anything is timed:
- native: a publication on the source and a subscription on target A (PostgreSQL's own logical
  replication, CREATE SUBSCRIPTION defaults: pgoutput, text format, no streaming);
- debezium: the engine (lambdas/core/engines/debezium.py) on target B, its connector (Debezium's
  embedded engine, a JVM) publishing to a local broker (Tansu), its appliers
  (lambdas/core/changestream/applier.py) as processes consuming it, each its share of the table
  topics (default: the local runtime's, one per table up to one more than the CPUs, as AWS runs
  one event source mapping per topic; `--appliers 1` for one applier against native apply's one
  worker).

Then two rounds, each on a fresh workload of exactly N row changes generated inside the source
(a PL/pgSQL procedure, transactions of 5-20 changes: about 45% inserts into orders, order_items
and events (jsonb, uuid), 45% updates of numeric, jsonb and text columns, 10% deletes), with the
consumers held back while it is written; then each pipeline, one after the other, applies it:
- round 1, apply: the native subscription is DISABLED and the debezium appliers PAUSED (the
  product's own pause: a flag on the target every batch reads, as the cutover uses it; the
  processes keep running, as they do in a migration) while the connector publishes everything (a logical message written after the workload reaches the
  broker only after every change before it). native: time from ENABLE until the target's
  replication origin passes the source's LSN at the end of the workload
  (lambdas.core.lsn.wait_for_lsn); this includes the walsender decoding the WAL. debezium: time
  from clearing the pause flag until the offsets they store on the target
  (_zdm.dbz_partitions) reach the topics' end offsets (the decoding was done by the connector
  before). This is the headline: ratio_apply = debezium apply rate / native (goal: >= 0.5).
- round 2, end to end: the connector is stopped too (engine.stop()) while the workload is
  written. debezium: time from engine.start() until the applier's stored offsets reach the
  topics' ends once the end marker is published (JVM start, Debezium's read and publish, apply);
  native: as in round 1, on this workload. ratio_end_to_end = debezium rate / native rate.
Both pipelines are timed one after the other, never at the same time; the applier's stored
offsets and the origin are polled every 10 ms. The topics' ends are read from the records, not
from the broker's high watermarks, which the local broker reports short (see true_end_offsets).
After each round both targets are compared row for row with the source (rehearsal.compare).
Rates are N / seconds. Exits non-zero if a target differs or a pipeline fails.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import Consumer, TopicPartition
from psycopg2 import sql

from bench.common import bench_servers, check_quiet, default_workers, emit_json, log, print_table, ticker, timed
from lambdas.core.changestream import state
from lambdas.core.changestream.connector import message_topic
from lambdas.core.changestream.kafka import KafkaStream, TopicOffsets
from lambdas.core.db import Connection, connect, execute, fetch_one, fetch_value
from lambdas.core.engines.base import Phase
from lambdas.core.engines.debezium import DebeziumEngine
from lambdas.core.lsn import Lsn, applied_lsn, current_lsn, wait_for_lsn
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.broker import Broker, start_broker
from rehearsal.changestream import APPLIER, LocalChangeStream, LocalStreamSettings, standalone_engine
from rehearsal.compare import compare_databases
from rehearsal.servers import PostgresServer

DBNAME = "shop"
GOAL_RATIO = 0.5  # debezium apply rate at least half of native apply's
TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)
NATIVE = "zdm_bench_native"  # publication, subscription and slot of the native pipeline
END_MARKER = "zdm-bench-end"  # logical message written after a workload
POLL_SECONDS = 0.01  # both pipelines' "applied yet?" polls
LOCAL_DEFAULTS = LocalStreamSettings(workdir="", bootstrap="", target_dsn="", prefix="", tables=())

# Exactly `n` row changes (statements that touched no row are not counted and are followed by
# another), in transactions of 5-20, deterministic for a seed. `tag` keeps the rows of each run apart.
# Keys picked at random are drawn into variables first: random() in a WHERE is evaluated per row.
WORKLOAD_PROCEDURE = """
CREATE PROCEDURE pg_temp.zdm_bench_changes(
    n bigint, seed double precision, tag text,
    INOUT changes bigint DEFAULT 0, INOUT deletes bigint DEFAULT 0, INOUT transactions bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    max_customer bigint;
    max_product int;
    max_order bigint;
    base_orders bigint;
    line_base int;
    delete_order bigint;
    delete_line int := 1;
    new_lines bigint := 0;
    new_events bigint := 0;
    gone_events bigint := 0;
    size int;
    in_tx int;
    r double precision;
    pick bigint;
    rc bigint;
BEGIN
    PERFORM setseed(seed);
    SELECT max(id) INTO max_customer FROM customers;
    SELECT max(id) INTO max_product FROM products;
    SELECT max(id) INTO max_order FROM orders;
    base_orders := max_order;
    SELECT coalesce(max(line_no), 0) + 1 INTO line_base FROM order_items;
    SELECT coalesce(min(order_id), base_orders + 1) INTO delete_order FROM order_items WHERE line_no = 1;
    WHILE changes < n LOOP
        size := least(5 + floor(random() * 16)::int, n - changes);
        in_tx := 0;
        WHILE in_tx < size LOOP
            rc := 0;
            r := random();
            IF r < 0.18 THEN
                INSERT INTO orders (customer_id, status, total, note)
                VALUES (1 + floor(random() * max_customer)::bigint, 'new', round((random() * 500)::numeric, 2),
                        CASE WHEN random() < 0.3 THEN NULL ELSE 'bench ' || tag || ' – ünïcødé' END)
                RETURNING id INTO pick;
                GET DIAGNOSTICS rc = ROW_COUNT;
                max_order := greatest(max_order, pick);
            ELSIF r < 0.30 THEN
                INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price)
                VALUES (1 + new_lines % base_orders, line_base + (new_lines / base_orders)::int,
                        1 + floor(random() * max_product)::int, 1 + floor(random() * 5)::int,
                        round((random() * 99 + 1)::numeric, 2));
                GET DIAGNOSTICS rc = ROW_COUNT;
                new_lines := new_lines + 1;
            ELSIF r < 0.45 THEN
                INSERT INTO events (id, order_id, kind, payload)
                VALUES (md5(tag || ':' || new_events)::uuid, 1 + floor(random() * max_order)::bigint, 'bench',
                        jsonb_build_object('seq', new_events, 'run', tag,
                                           'amount', round((random() * 1000)::numeric, 3),
                                           'lines', jsonb_build_array(floor(random() * 10)::int, 'x', NULL),
                                           'ok', random() < 0.5));
                GET DIAGNOSTICS rc = ROW_COUNT;
                new_events := new_events + 1;
            ELSIF r < 0.65 THEN
                pick := 1 + floor(random() * max_order)::bigint;
                UPDATE orders SET status = (ARRAY['paid','shipped','cancelled'])[1 + floor(random() * 3)::int],
                                  total = total + round((random() * 10)::numeric, 2)
                WHERE id = pick;
                GET DIAGNOSTICS rc = ROW_COUNT;
            ELSIF r < 0.80 THEN
                pick := 1 + floor(random() * max_customer)::bigint;
                UPDATE customers
                SET profile = jsonb_set(profile, '{visits}', to_jsonb(floor(random() * 1000)::int))
                              || jsonb_build_object('seen', tag, 'score', round((random() * 100)::numeric, 4))
                WHERE id = pick;
                GET DIAGNOSTICS rc = ROW_COUNT;
            ELSIF r < 0.85 THEN
                pick := 1 + floor(random() * max_product)::bigint;
                UPDATE products
                SET price = round((random() * 3000 + 1)::numeric, 2),
                    attributes = coalesce(attributes, '{}') || jsonb_build_object('stock', floor(random() * 50)::int)
                WHERE id = pick;
                GET DIAGNOSTICS rc = ROW_COUNT;
            ELSIF r < 0.90 THEN
                pick := 1 + floor(random() * base_orders)::bigint;
                UPDATE order_items SET quantity = 1 + floor(random() * 9)::int,
                                       unit_price = round((random() * 99 + 1)::numeric, 2)
                WHERE order_id = pick AND line_no = 1 + floor(random() * 2)::int;
                GET DIAGNOSTICS rc = ROW_COUNT;
            ELSIF r < 0.95 THEN
                IF gone_events < new_events THEN
                    DELETE FROM events WHERE id = md5(tag || ':' || gone_events)::uuid;
                    GET DIAGNOSTICS rc = ROW_COUNT;
                    gone_events := gone_events + 1;
                    deletes := deletes + rc;
                END IF;
            ELSIF delete_order <= base_orders THEN
                DELETE FROM order_items WHERE order_id = delete_order AND line_no = delete_line;
                GET DIAGNOSTICS rc = ROW_COUNT;
                deletes := deletes + rc;
                IF delete_line = 2 THEN
                    delete_order := delete_order + 1;
                    delete_line := 1;
                ELSE
                    delete_line := 2;
                END IF;
            END IF;
            in_tx := in_tx + rc;
            changes := changes + rc;
        END LOOP;
        COMMIT;
        transactions := transactions + 1;
    END LOOP;
END
$$"""


# -- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    changes: int
    deletes: int
    transactions: int
    seconds: float
    start_lsn: Lsn
    end_lsn: Lsn


def generate(source_dsn: str, events: int, seed: float, tag: str) -> Workload:
    """Write exactly `events` row changes on the source, as fast as the server can; its LSN range."""
    conn = connect(source_dsn, application_name="zdm-bench-workload")
    try:
        execute(conn, WORKLOAD_PROCEDURE)
        start = current_lsn(conn)
        with timed() as t:
            row = fetch_one(conn, "CALL pg_temp.zdm_bench_changes(%s, %s, %s)", (events, seed, tag))
        assert row is not None
        end = current_lsn(conn)
    finally:
        conn.close()
    changes, deletes, transactions = (int(v) for v in row)
    if changes != events:
        raise RuntimeError(f"the workload wrote {changes} changes, not {events}")
    log(
        f"workload {tag}: {changes:,} changes ({deletes:,} deletes) in {transactions:,} transactions in"
        f" {t.seconds:.2f}s ({changes / t.seconds:,.0f}/s), {(end - start) / 1e6:.1f} MB of WAL"
    )
    return Workload(changes, deletes, transactions, t.seconds, start, end)


# -- native logical replication ------------------------------------------------------------------


def native_start(source_dsn: str, target_dsn: str) -> float:
    """Publication + subscription (copy_data); returns once the initial copy is applied and caught up."""
    source, target = (
        connect(source_dsn, application_name="zdm-bench"),
        connect(target_dsn, application_name="zdm-bench"),
    )
    try:
        with timed() as t:
            execute(
                source,
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(NATIVE), sql.SQL(", ").join(table.ident for table in TABLES)
                ),
            )
            execute(
                target,
                sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}").format(
                    sql.Identifier(NATIVE), sql.Literal(source_dsn), sql.Identifier(NATIVE)
                ),
            )
            deadline = time.monotonic() + 300
            while fetch_value(target, "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the native subscription's initial copy did not finish within 300 s")
                time.sleep(0.1)
            wait_for_lsn(target, NATIVE, current_lsn(source), timeout=120, source=source, slot=NATIVE)
        return t.seconds
    finally:
        source.close()
        target.close()


def native_disable(target_dsn: str) -> None:
    """DISABLE, then wait until its apply worker has exited (the slot keeps every change)."""
    target = connect(target_dsn, application_name="zdm-bench")
    try:
        execute(target, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(NATIVE)))
        deadline = time.monotonic() + 30
        while fetch_value(
            target,
            "SELECT count(*) FROM pg_stat_subscription w JOIN pg_subscription s ON s.oid = w.subid"
            " WHERE s.subname = %s AND w.pid IS NOT NULL",
            (NATIVE,),
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the native subscription's worker did not exit within 30 s of DISABLE")
            time.sleep(0.05)
    finally:
        target.close()


def native_apply(source_dsn: str, target_dsn: str, workload: Workload) -> float:
    """ENABLE, then the time until the target has applied the source's WAL up to the workload's end."""
    source, target = (
        connect(source_dsn, application_name="zdm-bench"),
        connect(target_dsn, application_name="zdm-bench"),
    )
    watch = connect(target_dsn, application_name="zdm-bench-ticker")

    def progress() -> str:
        origin = applied_lsn(watch, NATIVE)
        left = workload.end_lsn - origin if origin is not None else workload.end_lsn - workload.start_lsn
        return f"native: {max(0, left) / 1e6:.1f} MB of the workload's WAL left to apply"

    try:
        with ticker(progress), timed() as t:
            execute(target, sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(NATIVE)))
            reached = wait_for_lsn(
                target,
                NATIVE,
                workload.end_lsn,
                timeout=3600,
                source=source,
                slot=NATIVE,
                poll_interval=POLL_SECONDS,
                max_poll_interval=POLL_SECONDS,
            )
        log(f"native: applied through {reached.reached_lsn} ({reached.signal}) in {t.seconds:.2f}s")
        return t.seconds
    finally:
        source.close()
        target.close()
        watch.close()


def native_drop(source_dsn: str, target_dsn: str) -> None:
    target = connect(target_dsn, application_name="zdm-bench")
    try:
        execute(target, sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(NATIVE)))
    finally:
        target.close()
    source = connect(source_dsn, application_name="zdm-bench")
    try:
        execute(source, sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(NATIVE)))
    finally:
        source.close()


# -- the debezium pipeline -------------------------------------------------------------------------


@dataclass
class Stream:
    engine: DebeziumEngine
    runtime: LocalChangeStream
    kafka: KafkaStream
    prefix: str
    target_dsn: str

    @property
    def topics(self) -> list[str]:
        return self.engine.plan.table_topics

    @property
    def applier_parts(self) -> list[str]:
        return [p for p in self.runtime.parts if p.startswith(APPLIER)]

    def start_applier(self) -> None:
        for part in self.applier_parts:
            self.runtime.start_part(part, self.engine.plan.connector, self.topics)

    def pause_applier(self, paused: bool) -> None:
        conn = connect(self.target_dsn, application_name="zdm-bench")
        try:
            state.set_applier_paused(conn, paused)
        finally:
            conn.close()

    def applier_running(self) -> bool:
        return all(self.runtime.process(part) is not None for part in self.applier_parts)

    def stored(self, conn: Connection) -> TopicOffsets:
        return state.stored_offsets(conn, self.topics)

    def log_tail(self, part: str, chars: int = 3000) -> str:
        path = self.runtime.workdir / part / "process.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def make_stream(
    source_dsn: str,
    target_dsn: str,
    broker: Broker,
    workdir: Path,
    batch_size: int,
    batch_window: float,
    appliers: int = LOCAL_DEFAULTS.appliers,
) -> Stream:
    engine = standalone_engine(
        "bench-apply",
        source_dsn,
        target_dsn,
        broker.bootstrap,
        workdir,
        TABLES,
        batch_size=batch_size,
        batch_window_seconds=batch_window,
        appliers=appliers,
    )
    runtime = engine.runtime
    assert isinstance(runtime, LocalChangeStream)
    return Stream(engine, runtime, engine.kafka, engine.plan.prefix, target_dsn)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, stream: Stream | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = ""
            if stream is not None:
                for part in ("connector", "applier"):
                    tails += f"\n--- {part} log tail ---\n{stream.log_tail(part)}"
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{tails}")
        time.sleep(0.2)


def true_end_offsets(stream: Stream, idle_seconds: float = 1.0) -> tuple[TopicOffsets, int]:
    """Each table topic's end (the offset after its last record), read from the records themselves;
    and by how many records the broker's own high watermarks fell short.

    The local broker (Tansu) reports a partition's high watermark as the first offset of its last
    record batch, not the offset after its last record (seen: watermark 7879 while the records
    ran to offset 7902), so `KafkaStream.end_offsets` falls short by up to one producer batch per
    topic. Reading from the reported watermark until nothing more arrives gives the true end.
    Call it only once everything is published (after the end marker).
    """
    reported = stream.kafka.end_offsets(stream.topics)
    consumer = Consumer(
        {
            "bootstrap.servers": stream.runtime.settings.bootstrap,
            "group.id": "zdm-bench-ends",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in reported.items()])
        ends = dict(reported)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_seconds:
            messages = consumer.consume(num_messages=1000, timeout=0.05)
            for message in messages:
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                if message.error() is None and topic is not None and partition is not None and offset is not None:
                    ends[(topic, partition)] = max(ends[(topic, partition)], offset + 1)
            if messages:
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return ends, sum(ends.values()) - sum(reported.values())


def left(ends: TopicOffsets, stored: TopicOffsets) -> int:
    return sum(max(0, end - stored.get(k, 0)) for k, end in ends.items())


class OffsetWatch:
    """Samples the offsets the applier stored on the target every POLL_SECONDS, with the time of each.

    The moment everything up to some ends was applied is then read from the samples, so it does not
    depend on when those ends became known (finding them takes a moment).
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._conn = connect(stream.target_dsn, application_name="zdm-bench-watch")
        self.samples: list[tuple[float, TopicOffsets]] = [(time.perf_counter(), stream.stored(self._conn))]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-offsets", daemon=True)

    def __enter__(self) -> OffsetWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.samples.append((time.perf_counter(), self._stream.stored(self._conn)))

    @property
    def latest(self) -> TopicOffsets:
        return self.samples[-1][1]

    def first(self, predicate: Callable[[TopicOffsets], bool]) -> float | None:
        return next((at for at, stored in self.samples if predicate(stored)), None)

    def wait_until_applied(self, ends: TopicOffsets, timeout: float, what: str) -> float:
        """Block until the stored offsets reach `ends`; the time (perf_counter) they first did."""
        deadline = time.monotonic() + timeout
        while left(ends, self.latest):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not applied within {timeout:g}s\n{self._stream.log_tail('applier')}")
            if not self._stream.applier_running():
                raise RuntimeError(f"{what}: the applier process exited\n{self._stream.log_tail('applier')}")
            time.sleep(POLL_SECONDS)
        reached = self.first(lambda stored: not left(ends, stored))
        assert reached is not None
        return reached


@dataclass(frozen=True)
class Marker:
    token: str
    before: TopicOffsets


def emit_end_marker(stream: Stream, source_dsn: str) -> Marker:
    """A logical message after everything written so far: once it is on the broker, so is all before it."""
    marker_topic = message_topic(stream.prefix)
    before = stream.kafka.end_offsets([marker_topic])
    token = uuid.uuid4().hex
    source = connect(source_dsn, application_name="zdm-bench")
    try:
        fetch_value(source, "SELECT pg_logical_emit_message(false, %s, %s)", (END_MARKER, token))
    finally:
        source.close()
    return Marker(token, before)


def wait_for_marker(stream: Stream, marker: Marker, timeout: float) -> None:
    # The connector produces a logical message only after every earlier change was acknowledged;
    # Debezium hex-encodes the message's content.
    found = stream.kafka.wait_for_message(
        message_topic(stream.prefix), marker.before, marker.token.encode().hex().encode(), timeout
    )
    if not found:
        raise TimeoutError(
            f"the connector did not publish the end marker within {timeout:g}s\n{stream.log_tail('connector')}"
        )


def stream_start(stream: Stream, source_dsn: str) -> float:
    """engine.start(): snapshot of the initial rows, published and applied; returns once all is applied."""
    with timed() as t:
        stream.engine.start()

        def snapshot_published() -> bool:
            status = stream.engine.status()
            if status.phase is Phase.FAILED:
                raise RuntimeError(f"the change stream failed: {'; '.join(status.problems)}")
            return status.copy_done

        with ticker(lambda: f"debezium: {stream.engine.status().pending_events} event(s) published, not applied"):
            wait_for(snapshot_published, 300, "the debezium snapshot", stream)
            wait_for_marker(stream, emit_end_marker(stream, source_dsn), timeout=300)
            ends, _ = true_end_offsets(stream)
            with OffsetWatch(stream) as watch:
                watch.wait_until_applied(ends, 300, "the snapshot")
    return t.seconds


@dataclass
class ApplyRun:
    seconds: float
    startup_seconds: float | None  # until the appliers' first batch was committed


def stream_apply(stream: Stream, ends: TopicOffsets, timeout: float = 3600) -> ApplyRun:
    """Resume the (paused, running) appliers; the time until the offsets they store on the target reach `ends`."""
    ticker_conn = connect(stream.target_dsn, application_name="zdm-bench-ticker")
    try:
        with OffsetWatch(stream) as watch:
            before = watch.latest
            total = left(ends, before)
            with ticker(
                lambda: f"debezium: {left(ends, stream.stored(ticker_conn)):,} of {total:,} records left to apply"
            ):
                started = time.perf_counter()
                stream.pause_applier(False)
                reached = watch.wait_until_applied(ends, timeout, "the workload")
            first = watch.first(lambda stored: stored != before)
        return ApplyRun(reached - started, None if first is None else first - started)
    finally:
        ticker_conn.close()


def stream_end_to_end(stream: Stream, marker: Marker, timeout: float = 3600) -> float:
    """engine.start() with both parts stopped; the time until everything up to `marker` is applied.

    Not `engine.wait_for_fence()`: it trusts the broker's high watermarks (see true_end_offsets).
    """
    ticker_conn = connect(stream.target_dsn, application_name="zdm-bench-ticker")

    def progress() -> str:
        on_broker = sum(stream.kafka.end_offsets(stream.topics).values())
        applied = sum(stream.stored(ticker_conn).values())
        return f"debezium: about {on_broker:,} records on the broker, {applied:,} applied"

    try:
        with OffsetWatch(stream) as watch, ticker(progress):
            started = time.perf_counter()
            stream.engine.start()
            wait_for_marker(stream, marker, timeout)
            published = time.perf_counter() - started
            ends, _ = true_end_offsets(stream)
            reached = watch.wait_until_applied(ends, timeout, "the workload")
        log(f"debezium: the connector had published the workload {published:.2f}s after the start")
        return reached - started
    finally:
        ticker_conn.close()


# -- checks ----------------------------------------------------------------------------------------


def equal(source_dsn: str, target_dsn: str, label: str) -> bool:
    with timed() as t:
        diffs = compare_databases(source_dsn, target_dsn, TABLES)
    bad = [d for d in diffs if not d.equal]
    rows = sum(d.source_rows for d in diffs)
    if bad:
        for d in bad:
            log(
                f"MISMATCH {label}: {d.table}: {len(d.missing_on_target)} missing, {len(d.extra_on_target)} extra,"
                f" {len(d.changed)} changed (first: {(d.missing_on_target + d.extra_on_target + d.changed)[:3]})"
            )
    else:
        log(f"{label}: equal to the source row for row ({rows:,} rows, {t.seconds:.1f}s)")
    return not bad


def dead_letters(target_dsn: str) -> int:
    conn = connect(target_dsn, application_name="zdm-bench")
    try:
        return int(
            fetch_value(conn, sql.SQL("SELECT count(*) FROM {}.dbz_dead_letters").format(sql.Identifier(state.SCHEMA)))
        )
    finally:
        conn.close()


def server_version(dsn: str) -> str:
    conn = connect(dsn, application_name="zdm-bench")
    try:
        return str(fetch_value(conn, "SHOW server_version")).split()[0]
    finally:
        conn.close()


def settled_source(dsn: str, rows: int) -> int:
    conn = connect(dsn, application_name="zdm-bench")
    try:
        sample.create_schema(conn)
        sizes = sample.load_data(conn, rows)
        execute(conn, "VACUUM ANALYZE")
        execute(conn, "CHECKPOINT")
    finally:
        conn.close()
    return sizes.total


def create_schema(dsn: str) -> None:
    conn = connect(dsn, application_name="zdm-bench")
    try:
        sample.create_schema(conn)
    finally:
        conn.close()


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass
class Result:
    events: int
    rows: int
    batch_size: int
    batch_window: float
    appliers: int = LOCAL_DEFAULTS.appliers
    version: str = ""
    workloads: list[Workload] = field(default_factory=list)
    native_seconds: float | None = None
    native_e2e_seconds: float | None = None
    dbz_apply: ApplyRun | None = None
    dbz_publish_wait_seconds: float | None = None
    dbz_records: int | None = None
    watermark_short_by: int | None = None
    dbz_e2e_seconds: float | None = None
    equal: dict[str, bool] = field(default_factory=dict)
    dead_letters: int | None = None
    cpu_busy: list[float] = field(default_factory=list)
    error: str | None = None

    def rate(self, seconds: float | None) -> float | None:
        return self.events / seconds if seconds else None

    @property
    def ratio_apply(self) -> float | None:
        if self.native_seconds and self.dbz_apply:
            return self.native_seconds / self.dbz_apply.seconds
        return None

    @property
    def ratio_end_to_end(self) -> float | None:
        if self.native_e2e_seconds and self.dbz_e2e_seconds:
            return self.native_e2e_seconds / self.dbz_e2e_seconds
        return None

    @property
    def both_equal(self) -> bool:
        return len(self.equal) == 4 and all(self.equal.values())

    @property
    def cpu_note(self) -> str:
        cpus = default_workers()
        if not self.cpu_busy:
            return f"{cpus} CPU(s); how busy they were could not be measured"
        worst = max(self.cpu_busy)
        note = (
            f"{cpus} CPU(s); busy before the timed runs (not ours, we were idle):"
            f" {', '.join(f'{b:.0%}' for b in self.cpu_busy)}"
        )
        if worst > 0.10:
            note += " -- WARNING: other processes were using the CPUs; timings are noisy"
        return note

    def to_json(self) -> dict[str, Any]:
        def r(value: float | None, digits: int = 3) -> float | None:
            return None if value is None else round(value, digits)

        apply = self.dbz_apply
        return {
            "events": self.events,
            "native_seconds": r(self.native_seconds),
            "native_rate": r(self.rate(self.native_seconds), 1),
            "debezium_apply_seconds": r(apply.seconds if apply else None),
            "debezium_apply_rate": r(self.rate(apply.seconds if apply else None), 1),
            "ratio_apply": r(self.ratio_apply, 4),
            "debezium_applier_startup_seconds": r(apply.startup_seconds if apply else None),
            "native_end_to_end_seconds": r(self.native_e2e_seconds),
            "debezium_end_to_end_seconds": r(self.dbz_e2e_seconds),
            "debezium_end_to_end_rate": r(self.rate(self.dbz_e2e_seconds), 1),
            "ratio_end_to_end": r(self.ratio_end_to_end, 4),
            "both_equal": self.both_equal,
            "equal": self.equal,
            "dead_letters": self.dead_letters,
            "debezium_records": self.dbz_records,
            "debezium_publish_wait_seconds": r(self.dbz_publish_wait_seconds),
            "broker_high_watermarks_short_by": self.watermark_short_by,
            "workload": [
                {
                    "changes": w.changes,
                    "deletes": w.deletes,
                    "transactions": w.transactions,
                    "seconds": r(w.seconds),
                    "wal_bytes": w.end_lsn - w.start_lsn,
                }
                for w in self.workloads
            ],
            "batch_size": self.batch_size,
            "appliers": self.appliers,
            "batch_window_seconds": self.batch_window,
            "postgresql": self.version,
            "goal_ratio_apply": GOAL_RATIO,
            "goal_met": bool(self.both_equal and self.ratio_apply is not None and self.ratio_apply >= GOAL_RATIO),
            "cpus": default_workers(),
            "cpu_busy_before": [round(b, 3) for b in self.cpu_busy],
            "cpu_note": self.cpu_note,
            "error": self.error,
        }


def quiet(result: Result, before_what: str) -> None:
    busy = check_quiet(before_what)
    if busy is not None:
        result.cpu_busy.append(busy)


def run(args: argparse.Namespace, result: Result) -> None:
    names = ["bench-apply-source", "bench-apply-native", "bench-apply-debezium"]
    with bench_servers(names, DBNAME) as (source, native_target, dbz_target):
        src, native_tgt, dbz_tgt = (s.dsn(DBNAME) for s in (source, native_target, dbz_target))
        result.version = server_version(src)
        with timed() as t:
            result.rows = settled_source(src, args.rows)
            create_schema(native_tgt)
            create_schema(dbz_tgt)
        log(f"source: {result.rows:,} rows of the sample shop loaded and settled in {t.seconds:.1f}s")
        broker = start_broker()
        log(f"broker (Tansu) up on {broker.bootstrap}")
        workdir = _workdir(dbz_target)
        stream = make_stream(src, dbz_tgt, broker, workdir, args.batch_size, args.batch_window, args.appliers)
        result.appliers = stream.runtime.settings.applier_count
        try:
            log("native: publication + subscription, initial copy")
            log(f"native: copied and caught up in {native_start(src, native_tgt):.1f}s")
            log("debezium: engine.start() (JVM, snapshot, publish, apply)")
            log(f"debezium: snapshot applied in {stream_start(stream, src):.1f}s")
            round_apply(args, result, stream, src, native_tgt, dbz_tgt)
            round_end_to_end(args, result, stream, src, native_tgt, dbz_tgt)
            result.dead_letters = dead_letters(dbz_tgt)
        finally:
            _teardown(stream, src, native_tgt, broker)


def round_apply(
    args: argparse.Namespace, result: Result, stream: Stream, src: str, native_tgt: str, dbz_tgt: str
) -> None:
    log("round 1 (apply): native subscription disabled, debezium appliers paused, connector running")
    native_disable(native_tgt)
    stream.pause_applier(True)
    before, _ = true_end_offsets(stream)
    workload = generate(src, args.events, 0.42, "r1")
    result.workloads.append(workload)
    with timed() as t:
        wait_for_marker(stream, emit_end_marker(stream, src), timeout=3600)
    result.dbz_publish_wait_seconds = t.seconds
    ends, result.watermark_short_by = true_end_offsets(stream)
    result.dbz_records = sum(ends.values()) - sum(before.values())
    expected = workload.changes + workload.deletes  # a delete is followed by its tombstone
    log(
        f"debezium: the connector had published {result.dbz_records:,} records ({expected:,} expected: each"
        f" delete adds a tombstone) {t.seconds:.2f}s after the workload ended; the broker's high watermarks"
        f" were {result.watermark_short_by} record(s) short of the true ends"
    )
    if result.dbz_records != expected:
        log(f"WARNING: {result.dbz_records:,} records published for {expected:,} changes and tombstones")
    quiet(result, "native apply")
    log(f"native: ENABLE and apply {workload.changes:,} changes")
    result.native_seconds = native_apply(src, native_tgt, workload)
    log(f"native: {result.rate(result.native_seconds):,.0f} changes/s")
    quiet(result, "debezium apply")
    log(f"debezium: resume the appliers and apply {result.dbz_records:,} records")
    result.dbz_apply = stream_apply(stream, ends)
    log(
        f"debezium: applied in {result.dbz_apply.seconds:.2f}s ({result.rate(result.dbz_apply.seconds):,.0f}"
        f" changes/s; first batch committed {result.dbz_apply.startup_seconds or 0:.2f}s after the resume)"
    )
    result.equal["native_apply"] = equal(src, native_tgt, "native target after round 1")
    result.equal["debezium_apply"] = equal(src, dbz_tgt, "debezium target after round 1")


def round_end_to_end(
    args: argparse.Namespace, result: Result, stream: Stream, src: str, native_tgt: str, dbz_tgt: str
) -> None:
    log("round 2 (end to end): native subscription disabled, debezium connector and applier stopped")
    native_disable(native_tgt)
    stream.engine.stop()
    workload = generate(src, args.events, 0.77, "r2")
    result.workloads.append(workload)
    marker = emit_end_marker(stream, src)
    quiet(result, "native apply (round 2)")
    log(f"native: ENABLE and apply {workload.changes:,} changes")
    result.native_e2e_seconds = native_apply(src, native_tgt, workload)
    quiet(result, "debezium end to end")
    log(f"debezium: engine.start() and apply {workload.changes:,} changes (JVM start, read, publish, apply)")
    result.dbz_e2e_seconds = stream_end_to_end(stream, marker)
    log(f"debezium: end to end in {result.dbz_e2e_seconds:.2f}s ({result.rate(result.dbz_e2e_seconds):,.0f} changes/s)")
    result.equal["native_end_to_end"] = equal(src, native_tgt, "native target after round 2")
    result.equal["debezium_end_to_end"] = equal(src, dbz_tgt, "debezium target after round 2")


def _workdir(server: PostgresServer) -> Path:
    # beside the target server's files: removed with it, whatever happens to us
    path = server.directory / "bench-stream"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _teardown(stream: Stream, src: str, native_tgt: str, broker: Broker) -> None:
    try:
        removed = stream.engine.teardown().removed
        log(f"debezium: teardown removed {', '.join(removed) or 'nothing'}")
    except Exception as exc:
        log(f"debezium: teardown failed ({type(exc).__name__}: {exc}); the servers are thrown away anyway")
    try:
        native_drop(src, native_tgt)
    except Exception as exc:
        log(f"native: drop failed ({type(exc).__name__}: {exc})")
    broker.stop()
    log("broker stopped")


# -- output ----------------------------------------------------------------------------------------


def report(out: TextIO, result: Result) -> None:
    apply = result.dbz_apply
    native = f"native logical replication (PostgreSQL {result.version})"
    print(file=out)
    print(
        f"{result.events:,} row changes per round (about 45% inserts, 45% updates, 10% deletes; 5-20 per"
        f" transaction) on the sample shop of {result.rows:,} rows; applier batch up to {result.batch_size},"
        f" window {result.batch_window:g}s",
        file=out,
    )
    print_table(
        ["pipeline", "seconds", "changes/s", "ratio to native", "target = source"],
        [
            [
                f"round 1, apply: {native}",
                result.native_seconds,
                result.rate(result.native_seconds),
                None,
                result.equal.get("native_apply"),
            ],
            [
                f"round 1, apply: debezium, {result.appliers} applier(s)",
                apply.seconds if apply else None,
                result.rate(apply.seconds if apply else None),
                result.ratio_apply,
                result.equal.get("debezium_apply"),
            ],
            [
                f"round 2, end to end: {native}",
                result.native_e2e_seconds,
                result.rate(result.native_e2e_seconds),
                None,
                result.equal.get("native_end_to_end"),
            ],
            [
                "round 2, end to end: debezium (JVM+publish+apply)",
                result.dbz_e2e_seconds,
                result.rate(result.dbz_e2e_seconds),
                result.ratio_end_to_end,
                result.equal.get("debezium_end_to_end"),
            ],
        ],
        out,
    )
    if apply and apply.startup_seconds is not None:
        print(f"debezium appliers: first batch committed {apply.startup_seconds:.2f}s after the resume", file=out)
    ratio = result.ratio_apply
    met = "met" if result.both_equal and ratio is not None and ratio >= GOAL_RATIO else "NOT met"
    print(
        f"ratio apply (debezium apply rate / native): {'-' if ratio is None else f'{ratio:.3f}'}"
        f" (goal >= {GOAL_RATIO}: {met}); ratio end to end: "
        f"{'-' if result.ratio_end_to_end is None else f'{result.ratio_end_to_end:.3f}'}; "
        f"both targets equal the source: {'yes' if result.both_equal else 'NO'}; dead letters: {result.dead_letters}",
        file=out,
    )
    print(result.cpu_note, file=out)
    out.flush()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="row changes per round (default 100,000)")
    parser.add_argument("--rows", type=int, default=20_000, help="initial rows in the sample shop (default 20,000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=LOCAL_DEFAULTS.batch_size,
        help=f"applier: records per target transaction (default {LOCAL_DEFAULTS.batch_size}, the local runtime's)",
    )
    parser.add_argument(
        "--batch-window",
        type=float,
        default=LOCAL_DEFAULTS.batch_window_seconds,
        help=f"applier: seconds it waits to fill a batch (default {LOCAL_DEFAULTS.batch_window_seconds:g})",
    )
    parser.add_argument(
        "--appliers",
        type=int,
        default=LOCAL_DEFAULTS.appliers,
        help="applier processes, each with its own share of the table topics (default: the local runtime's,"
        " one per table up to one more than the CPUs; AWS runs one Lambda mapping per topic; 1 compares one"
        " applier with native apply's one worker)",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.events < 100:
        parser.error("--events must be at least 100")
    if args.rows < 1000:
        parser.error("--rows must be at least 1000")
    if not 1 <= args.batch_size <= 10_000:
        parser.error("--batch-size must be between 1 and 10,000")
    if args.batch_window < 0:
        parser.error("--batch-window must be 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = Result(args.events, args.rows, args.batch_size, args.batch_window, args.appliers)
    try:
        run(args, result)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result.error}")
    out: TextIO = sys.stderr if args.json else sys.stdout
    report(out, result)
    if args.json:
        emit_json(result.to_json())
    if result.error or not result.both_equal:
        print("error: a pipeline failed or a target differs from the source (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
