"""The applier's consume loop over a Kafka consumer (the local stand-in for Lambda's event source mapping).

Partitions are assigned explicitly from the offsets stored on the target, which are the truth
(lambdas/core/changestream/state.py); Kafka's committed offsets are written after each target
commit, for monitoring and tooling.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg2.errors
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from lambdas.core.changestream import state
from lambdas.core.changestream.applier import ApplyResult, ChangeApplier, ReadBatch
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


PAUSED_POLL_SECONDS = 0.05  # how often a paused applier asks the target whether it may go on
GATHER_IDLE_SECONDS = 0.005  # no record for this long once a batch has begun: the backlog is drained


def gather(consumer: Any, batch_size: int, window_seconds: float) -> list[Any]:
    """Up to `batch_size` messages: what the consumer holds already, then what arrives within the window.

    The window bounds how long a batch is gathered (like the event source mapping's batching window),
    but a batch is not held back once the broker has nothing more to give: a backlog is applied in
    full batches at once, and a change arriving alone is applied within about GATHER_IDLE_SECONDS
    rather than after the whole window (lower lag; the last batch of a burst does not wait).
    """
    window = max(window_seconds, 0.05)
    deadline = time.monotonic() + window
    messages: list[Any] = consumer.consume(num_messages=batch_size, timeout=0)
    while len(messages) < batch_size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not messages:  # wait for the first one, up to the window
            messages = consumer.consume(num_messages=1, timeout=left)
            continue
        more = consumer.consume(num_messages=batch_size - len(messages), timeout=min(left, GATHER_IDLE_SECONDS))
        if not more:
            break
        messages += more
    return messages


def run(
    consumer: Any,
    applier: ChangeApplier,
    *,
    batch_size: int,
    window_seconds: float,
    should_stop: Callable[[], bool],
    on_batch: Callable[[ApplyResult], None] | None = None,
) -> None:
    """Consume, apply a batch per target transaction, then commit Kafka offsets; until `should_stop`.

    The next batch is consumed and parsed on a second thread while the current one is applied (the
    target's work and ours overlap). Only this loop's thread moves the consumer's position (assign):
    it first waits for the read in flight and drops it, so a batch read before is never applied after.
    """

    def read_next() -> ReadBatch:
        return applier.read(to_records(gather(consumer, batch_size, window_seconds)))

    def restart(ahead: Future[ReadBatch]) -> Future[ReadBatch]:
        with contextlib.suppress(Exception):  # dropped: read again from the target's offsets
            ahead.result()
        assign_from_target(consumer, applier.target, sorted({p.topic for p in consumer.assignment()}))
        time.sleep(max(window_seconds, 0.1))
        return reader.submit(read_next)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdm-read-ahead") as reader:
        ahead = reader.submit(read_next)
        try:
            while not should_stop():
                batch = ahead.result()
                ahead = reader.submit(read_next)
                if not batch.entries:
                    continue
                try:
                    result = applier.apply(batch)
                    while result.paused and not should_stop():
                        # Nothing applied, no offset moved: this batch is still the next one. Try it again
                        # shortly (a resume takes effect within PAUSED_POLL_SECONDS), without reading again.
                        time.sleep(PAUSED_POLL_SECONDS)
                        result = applier.apply(batch)
                except _RETRYABLE as exc:  # rolled back: read the batch again from the target's offsets
                    logger.warning("batch rolled back, retrying: %s", str(exc).strip().splitlines()[0])
                    ahead = restart(ahead)
                    continue
                if result.paused:  # stopping while paused: nothing of this batch was applied
                    continue
                next_offsets: dict[tuple[str, int], int] = {}
                for rec, _ in batch.entries:  # in offset order: the last one per partition wins
                    next_offsets[(rec.topic, rec.partition)] = rec.offset + 1
                # for monitoring only (the target's offsets are the truth): not waited for
                consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=True
                )
                if on_batch is not None:
                    on_batch(result)
        finally:
            with contextlib.suppress(Exception):
                ahead.result()
