"""The local stand-in for the applier Lambda and its event source mapping.

`python -m rehearsal.applier_process <config.json>` consumes the table topics from the local
broker and applies them to the target with the same core the Lambda runs
(lambdas/core/changestream). Dead letters go to the DLQ topic and the target's table.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from lambdas.core.changestream import consumer as consume_loop
from lambdas.core.changestream.applier import ChangeApplier
from lambdas.core.changestream.deadletters_kafka import KafkaDeadLetters
from lambdas.core.changestream.state import ensure_state_tables
from lambdas.core.changestream.target import StreamRouting
from lambdas.core.db import Connection, DatabaseUnreachable, connect, connection_lost
from lambdas.core.fence import make_writable
from lambdas.core.tables import TableName

logger = logging.getLogger("zdm.applier")


# After the target went away (a crash, a restart): how long before connecting again, as the event source
# mapping retries a failed batch with a new invocation, which opens a new connection
RECONNECT_SECONDS = 1.0


def open_target(config: dict[str, Any]) -> tuple[Connection, StreamRouting]:
    target = connect(config["target_dsn"], application_name="zdm-applier", autocommit=False)
    make_writable(target)  # the target is fenced (read-only by default) until the cutover
    target.commit()
    ensure_state_tables(target)
    routing = StreamRouting.load(target, config["prefix"], [TableName.parse(t) for t in config["tables"]])
    if not config.get("heartbeats", True):  # another applier process consumes them
        routing = StreamRouting(routing.tables, None)
    return target, routing


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    producer = Producer({"bootstrap.servers": config["bootstrap"], "enable.idempotence": True, "acks": "all"})
    consumer = Consumer(
        {
            "bootstrap.servers": config["bootstrap"],
            "group.id": config["group_id"],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    try:
        while not stopping.is_set():
            try:
                target, routing = open_target(config)
            except DatabaseUnreachable as exc:
                logger.warning("target unreachable, connecting again: %s", exc)
                stopping.wait(RECONNECT_SECONDS)
                continue
            applier = ChangeApplier(target, routing, KafkaDeadLetters(producer, config["dead_letter_topic"]))
            try:
                # From the target's offsets, each time: what the lost transaction held is read again
                consume_loop.assign_from_target(consumer, target, routing.topics)
                consume_loop.run(
                    consumer,
                    applier,
                    batch_size=int(config["batch_size"]),
                    window_seconds=float(config["batch_window_seconds"]),
                    should_stop=stopping.is_set,
                )
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                logger.warning("target connection lost, connecting again: %s", str(exc).strip().splitlines()[0])
                stopping.wait(RECONNECT_SECONDS)
            finally:
                target.close()
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
