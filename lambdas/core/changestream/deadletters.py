"""Dead letters: events the applier cannot apply, kept with the reason and their position.

Every dead letter is recorded on the target (`_zdm.dbz_dead_letters`, in the same transaction as
the offsets, so it is counted exactly once) and handed to a sink for operators: a Kafka topic
locally (deadletters_kafka.py), an SQS queue on AWS (deadletters_sqs.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    source_lsn: int | None
    reason: str
    key: str | None
    value: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class DeadLetterSink(ABC):
    @abstractmethod
    def send(self, letters: Sequence[DeadLetter]) -> None:
        """Deliver durably before returning (the target commits the offsets right after)."""


class NoDeadLetterSink(DeadLetterSink):
    """Only the target's table keeps them (tests, or a deployment without a queue)."""

    def send(self, letters: Sequence[DeadLetter]) -> None:
        return None
