"""The applier's consume loop (lambdas/core/changestream/consumer.py) on a real broker and target:
it reads the next batch while the current one is applied, and a batch rolled back on the target is
applied again before anything read after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg2.errors
import pytest
from confluent_kafka import Consumer, Producer

from lambdas.core.changestream import consumer as consume_loop
from lambdas.core.changestream import state
from lambdas.core.changestream.applier import ApplyResult, ChangeApplier, ReadBatch
from lambdas.core.changestream.kafka import KafkaStream
from lambdas.core.changestream.target import StreamRouting
from lambdas.core.db import Connection, connect, fetch_all
from rehearsal.broker import Broker
from tests.integration.test_changestream_applier import ITEMS, PREFIX, CollectingSink, Stream, item, open_target

TOPIC = f"{PREFIX}.public.items"
ROWS = 600


class FlakyApplier(ChangeApplier):
    """The real applier, but its `fail_at`-th batch fails once as a deadlock would (rolled back on the
    target); records the offsets of every batch it applied, in order."""

    def __init__(self, *args: Any, fail_at: int | None = 2) -> None:
        super().__init__(*args)
        self.calls = 0
        self.fail_at = fail_at
        self.applied: list[tuple[int, int]] = []  # (first offset, last offset) per committed batch

    def apply(self, records: Any) -> ApplyResult:
        self.calls += 1
        if self.calls == self.fail_at:
            self.target.rollback()
            raise psycopg2.errors.DeadlockDetected("deadlock detected (injected by the test)")
        result = super().apply(records)
        if not result.paused and isinstance(records, ReadBatch) and records.entries:
            self.applied.append((records.entries[0][0].offset, records.entries[-1][0].offset))
        return result


@pytest.fixture
def target(fresh_dbs: tuple[str, str]) -> Iterator[Connection]:
    with closing(open_target(fresh_dbs[1], "zdm-consumer-test")) as conn:
        yield conn


def publish(broker: Broker, topic: str) -> int:
    """Each row created, then updated twice (qty 1, 2, 3): the last version must win. Returns the count."""
    s = Stream(topic)
    records = [s.create(item(i, qty=1), (1000 + i, 1000 + i)) for i in range(1, ROWS + 1)]
    records += [s.update(item(i, qty=2), (5000 + i, 5000 + i)) for i in range(1, ROWS + 1)]
    records += [s.update(item(i, qty=3), (9000 + i, 9000 + i)) for i in range(1, ROWS + 1)]
    KafkaStream({"bootstrap.servers": broker.bootstrap}).ensure_topics([topic])
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"})
    for rec in records:
        producer.produce(topic, key=rec.key, value=rec.value)
    assert producer.flush(30) == 0
    return len(records)


def test_a_rolled_back_batch_is_applied_again_before_the_batch_read_ahead(
    broker: Broker, target: Connection, fresh_dbs: tuple[str, str]
) -> None:
    # Given 1,800 changes on a topic and an applier whose second batch is rolled back once (deadlock)
    total = publish(broker, TOPIC)
    applier = FlakyApplier(target, StreamRouting.load(target, PREFIX, [ITEMS]), CollectingSink())
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "zdm-consumer-test",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    watch = connect(fresh_dbs[1], application_name="zdm-consumer-test-watch")
    done = threading.Event()

    def applied_all() -> bool:
        if not done.is_set() and state.stored_offsets(watch, [TOPIC]).get((TOPIC, 0), 0) >= total:
            done.set()
        return done.is_set()

    # When the loop runs (batches of 250, each next one read while the current one is applied)
    try:
        consume_loop.assign_from_target(consumer, target, [TOPIC])
        consume_loop.run(consumer, applier, batch_size=250, window_seconds=0.05, should_stop=applied_all)
    finally:
        consumer.close()
        watch.close()

    # Then the failed batch was read again and applied, and nothing read ahead was applied before it:
    # the committed batches cover the offsets 0..total-1 in order, without a gap or an overlap
    assert applier.calls >= 3
    assert applier.applied[0][0] == 0 and applier.applied[-1][1] == total - 1
    assert all(later[0] == earlier[1] + 1 for earlier, later in zip(applier.applied, applier.applied[1:], strict=False))
    # And every row holds its last version
    final = fetch_all(target, "SELECT count(*), min(qty), max(qty) FROM items")
    target.rollback()
    assert final == [(ROWS, 3, 3)]


def test_a_paused_applier_applies_nothing_and_goes_on_in_order_once_resumed(
    broker: Broker, target: Connection, fresh_dbs: tuple[str, str]
) -> None:
    # Given the pause flag set on the target, and 1,800 changes on a topic
    prefix = "zdm_paused"  # the module's broker is shared: topics of this test's own
    topic = f"{prefix}.public.items"
    control = connect(fresh_dbs[1], application_name="zdm-consumer-test-control")
    state.set_applier_paused(control, True)
    total = publish(broker, topic)
    applier = FlakyApplier(target, StreamRouting.load(target, prefix, [ITEMS]), CollectingSink(), fail_at=None)
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "zdm-consumer-test-paused",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    stop = threading.Event()
    consume_loop.assign_from_target(consumer, target, [topic])
    loop = threading.Thread(
        target=consume_loop.run,
        args=(consumer, applier),
        kwargs={"batch_size": 250, "window_seconds": 0.05, "should_stop": stop.is_set},
    )
    loop.start()
    try:
        # When the loop has run a while paused
        deadline = time.monotonic() + 30
        while applier.calls < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Then it kept asking, and nothing was applied
        assert applier.calls >= 5 and applier.applied == []
        assert state.stored_offsets(control, [topic]).get((topic, 0), 0) == 0
        # When the flag is cleared, then everything is applied, in offset order, without a gap
        state.set_applier_paused(control, False)
        while state.stored_offsets(control, [topic]).get((topic, 0), 0) < total and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(30)
        consumer.close()
        control.close()
    assert applier.applied[0][0] == 0 and applier.applied[-1][1] == total - 1
    assert all(later[0] == earlier[1] + 1 for earlier, later in zip(applier.applied, applier.applied[1:], strict=False))
    final = fetch_all(target, "SELECT count(*), min(qty), max(qty) FROM items")
    target.rollback()
    assert final == [(ROWS, 3, 3)]
