"""The local stand-in for MSK Connect: Debezium's embedded engine publishing to the local broker.

`python -m rehearsal.connector_process <config.json>` runs the PostgreSQL connector through
pydbzengine (Java 17) and produces every change event to Kafka, to the topic Debezium names, keyed
by primary key. A batch is handed back to Debezium (which then stores its offsets) only after
the broker acknowledged every record of it, so a crash republishes, never skips. A logical
decoding message (the cutover's fence marker) is produced only after everything before it was
acknowledged: whoever sees the marker knows every earlier change is on the broker.

Offsets are kept in a file beside the config: a restarted connector resumes where it stopped,
without a new snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from lambdas.core.changestream.connector import message_topic

FLUSH_TIMEOUT_S = 60.0


def embedded_properties(config: dict[str, Any], directory: Path) -> dict[str, str]:
    props = dict(config["properties"])
    props.update(
        {
            "name": "zdm-local-connector",
            "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
            "offset.storage.file.filename": str(directory / "offsets.dat"),
            "offset.flush.interval.ms": str(config.get("offset_flush_ms", 1000)),
        }
    )
    return props


def main(argv: list[str]) -> int:
    config_path = Path(argv[1]).resolve()
    config = json.loads(config_path.read_text())
    # Debezium's log4j writes logs/ and a JVM crash writes hs_err_pid*.log into the working folder:
    # keep them in this process's own folder (sys.path already holds the project root).
    os.chdir(config_path.parent)
    # MSK Connect's workers run in UTC; Debezium turns some special values (infinite dates) through the
    # JVM's default zone, so the local connector runs in UTC as well and sends the same encodings.
    os.environ["TZ"] = "UTC"
    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine  # starts nothing until used

    producer = Producer(
        {
            "bootstrap.servers": config["bootstrap"],
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    marker_topic = message_topic(config["properties"]["topic.prefix"])

    def flush() -> None:
        left = producer.flush(FLUSH_TIMEOUT_S)
        if left:
            raise RuntimeError(f"{left} change event(s) not acknowledged by the broker in {FLUSH_TIMEOUT_S:g} s")

    class KafkaPublisher(BasePythonChangeHandler):
        def handleJsonBatch(self, records: list[Any]) -> None:
            for record in records:
                topic = str(record.destination())
                key = record.key()
                value = record.value()
                if topic == marker_topic:
                    flush()
                producer.produce(
                    topic,
                    key=None if key is None else str(key).encode(),
                    value=None if value is None else str(value).encode(),
                )
                if topic == marker_topic:
                    flush()
            flush()

    engine = DebeziumJsonEngine(properties=embedded_properties(config, config_path.parent), handler=KafkaPublisher())
    failure: list[BaseException] = []

    def run() -> None:
        try:
            engine.run()
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, name="debezium", daemon=True)
    stopping = threading.Event()

    def _stop(*_: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.start()
    while worker.is_alive() and not stopping.wait(0.2):
        pass
    if stopping.is_set():
        engine.close()  # graceful: Debezium commits its offsets
        worker.join(30)
    if failure:
        logging.getLogger("zdm.connector").error("connector failed: %r", failure[0])
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: finalizing Python while JVM threads still run crashes in JPype (SIGSEGV);
    # the engine is closed and its offsets committed by now.
    os._exit(code)
