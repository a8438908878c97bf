"""The applier's consume loop over a Kafka consumer (the local stand-in for Lambda's event source mapping).

Partitions are assigned explicitly from the offsets stored on the target, which are the truth
(lambdas/core/changestream/state.py); Kafka's committed offsets are written after each target
commit, for monitoring and tooling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg2.errors
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from lambdas.core.changestream import state
from lambdas.core.changestream.applier import ApplyResult, ChangeApplier
from lambdas.core.changestream.events import StreamRecord
from lambdas.core.db import Connection

# Errors that leave the connection usable and the batch worth trying again: serialization failures
# and deadlocks (40), a lock or statement timeout (55P03, 57014). Anything else ends the loop.
_RETRYABLE = (
    psycopg2.errors.TransactionRollbackError,
    psycopg2.errors.LockNotAvailable,
    psycopg2.errors.QueryCanceled,
)
logger = logging.getLogger("zdm.applier")


def assign_from_target(consumer: Any, target: Connection, topics: Sequence[str], timeout: float = 10.0) -> None:
    stored = state.stored_offsets(target, topics)
    metadata = consumer.list_topics(timeout=timeout)
    assignment = []
    for topic in topics:
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            raise RuntimeError(f"topic {topic!r} does not exist on the broker (the connector creates it at start)")
        for partition in described.partitions:
            assignment.append(TopicPartition(topic, partition, stored.get((topic, partition), OFFSET_BEGINNING)))
    consumer.assign(assignment)


def to_records(messages: Sequence[Any]) -> list[StreamRecord]:
    records = []
    for message in messages:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                continue
            raise KafkaException(error)
        records.append(
            StreamRecord(message.topic(), message.partition(), message.offset(), message.key(), message.value())
        )
    return records


def run(
    consumer: Any,
    applier: ChangeApplier,
    *,
    batch_size: int,
    window_seconds: float,
    should_stop: Callable[[], bool],
    on_batch: Callable[[ApplyResult], None] | None = None,
) -> None:
    """Consume, apply a batch per target transaction, then commit Kafka offsets; until `should_stop`."""
    while not should_stop():
        records = to_records(consumer.consume(num_messages=batch_size, timeout=max(window_seconds, 0.05)))
        if not records:
            continue
        try:
            result = applier.apply(records)
        except _RETRYABLE as exc:  # rolled back: read the batch again from the target's offsets
            logger.warning("batch rolled back, retrying: %s", str(exc).strip().splitlines()[0])
            assign_from_target(consumer, applier.target, sorted({p.topic for p in consumer.assignment()}))
            time.sleep(max(window_seconds, 0.1))
            continue
        if result.paused:  # nothing applied: read these records again once resumed
            assign_from_target(consumer, applier.target, sorted({p.topic for p in consumer.assignment()}))
            time.sleep(max(window_seconds, 0.1))
            continue
        next_offsets: dict[tuple[str, int], int] = {}
        for rec in records:
            next_offsets[(rec.topic, rec.partition)] = max(
                next_offsets.get((rec.topic, rec.partition), 0), rec.offset + 1
            )
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=False)
        if on_batch is not None:
            on_batch(result)
