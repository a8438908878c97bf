"""Kafka access the engine needs besides the applier: topics, end offsets, the fence marker.

Takes a confluent-kafka client configuration (bootstrap servers and, on MSK, the sign-in
settings); the clients are created per use and closed, as the replication task is short-lived.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

TopicOffsets = dict[tuple[str, int], int]


class KafkaStream:
    def __init__(self, config: Mapping[str, Any], timeout: float = 10.0) -> None:
        self._config = dict(config)
        self._timeout = timeout

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                **self._config,
                "group.id": "zdm-monitor",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,  # an empty fetch returns at once: the cutover waits on these reads
            }
        )

    def ensure_topics(self, topics: Iterable[str], partitions: int = 1) -> list[str]:
        """Create the topics that do not exist (one partition each: one table's changes stay in order)."""
        admin = AdminClient(self._config)
        existing = set(admin.list_topics(timeout=self._timeout).topics)
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        if not wanted:
            return []
        futures = admin.create_topics([NewTopic(t, partitions, 1) for t in wanted])
        for future in futures.values():
            try:
                future.result(self._timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        return wanted

    def end_offsets(self, topics: Iterable[str]) -> TopicOffsets:
        """Each partition's end: the offset the next record will get.

        The high watermark, confirmed by reading from just before it to the partition's end: some
        Kafka-compatible brokers (the local Tansu) report the last record batch's base offset + 1, which
        would let the fence pass and the lag read 0 while records are still to be applied.
        """
        consumer = Consumer(
            {
                **self._config,
                "group.id": "zdm-monitor",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,  # the end is an empty fetch: do not let the broker hold it
            }
        )
        try:
            metadata = consumer.list_topics(timeout=self._timeout)
            out: TopicOffsets = {}
            starts: list[TopicPartition] = []
            for topic in topics:
                described = metadata.topics.get(topic)
                if described is None or described.error is not None:
                    continue
                for partition in described.partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=self._timeout)
                    out[(topic, partition)] = int(high)
                    if high > low:
                        starts.append(TopicPartition(topic, partition, max(int(low), int(high) - 1)))
            self._read_to_end(consumer, starts, out)
            return out
        finally:
            consumer.close()

    def _read_to_end(self, consumer: Consumer, starts: list[TopicPartition], ends: TopicOffsets) -> None:
        if not starts:
            return
        consumer.assign(starts)
        waiting = {(tp.topic, tp.partition) for tp in starts}
        deadline = time.monotonic() + self._timeout
        while waiting:
            if time.monotonic() > deadline:
                raise KafkaException(f"end of {len(waiting)} partition(s) not reached in {self._timeout:g} s")
            for message in consumer.consume(num_messages=1000, timeout=0.05):
                key = (str(message.topic()), message.partition() or 0)
                offset = message.offset() or 0
                error = message.error()
                if error is None:
                    ends[key] = max(ends[key], offset + 1)
                elif error.code() == KafkaError._PARTITION_EOF:
                    ends[key] = max(ends[key], offset)
                    waiting.discard(key)
                else:
                    raise KafkaException(error)

    def wait_for_message(self, topic: str, start: TopicOffsets, needle: bytes, timeout: float) -> bool:
        """Whether a record whose value contains `needle` arrives on `topic` after `start`, within `timeout`."""
        consumer = self._consumer()
        try:
            metadata = consumer.list_topics(topic, timeout=self._timeout)
            described = metadata.topics.get(topic)
            partitions = list(described.partitions) if described is not None and described.error is None else [0]
            consumer.assign([TopicPartition(topic, p, start.get((topic, p), 0)) for p in partitions])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for message in consumer.consume(num_messages=500, timeout=0.05):
                    if message.error() is None and needle in (message.value() or b""):
                        return True
            return False
        finally:
            consumer.close()
