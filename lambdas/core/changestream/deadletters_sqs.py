"""Dead letters to an SQS queue (on AWS, the queue the stack created for the applier)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lambdas.core.changestream.deadletters import DeadLetter, DeadLetterSink

_SQS_BATCH = 10  # SendMessageBatch takes at most ten messages


class SqsDeadLetters(DeadLetterSink):
    def __init__(self, sqs_client: Any, queue_url: str) -> None:
        self._sqs = sqs_client
        self._queue_url = queue_url

    def send(self, letters: Sequence[DeadLetter]) -> None:
        for start in range(0, len(letters), _SQS_BATCH):
            batch = letters[start : start + _SQS_BATCH]
            entries = [{"Id": str(i), "MessageBody": letter.to_json()} for i, letter in enumerate(batch)]
            response = self._sqs.send_message_batch(QueueUrl=self._queue_url, Entries=entries)
            if response.get("Failed"):
                reasons = "; ".join(f"{f.get('Code')}: {f.get('Message')}" for f in response["Failed"])
                raise RuntimeError(f"SQS refused {len(response['Failed'])} dead letter(s): {reasons}")
