"""Dead letters to a Kafka topic (the local broker), keyed by the failed record's position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lambdas.core.changestream.deadletters import DeadLetter, DeadLetterSink


class KafkaDeadLetters(DeadLetterSink):
    def __init__(self, producer: Any, topic: str, timeout: float = 30.0) -> None:
        self._producer = producer  # a confluent_kafka.Producer
        self._topic = topic
        self._timeout = timeout

    def send(self, letters: Sequence[DeadLetter]) -> None:
        for letter in letters:
            key = f"{letter.topic}/{letter.partition}/{letter.offset}"
            self._producer.produce(self._topic, key=key.encode(), value=letter.to_json().encode())
        if letters and self._producer.flush(self._timeout) > 0:
            raise RuntimeError(f"dead letters not acknowledged by the broker within {self._timeout} s")
