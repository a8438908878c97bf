"""A Debezium change stream between two test databases: a broker, the connector and the applier
as real processes (rehearsal/changestream.py), driven through the engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lambdas.core.db import connect
from lambdas.core.engines.debezium import DebeziumEngine
from lambdas.core.tables import TableName
from rehearsal.broker import Broker
from rehearsal.changestream import LocalChangeStream, standalone_engine


def make_engine(
    src: str,
    tgt: str,
    broker: Broker,
    workdir: Path,
    tables: Sequence[TableName],
    *,
    name: str = "dbz-test",
    batch_size: int = 500,
    batch_window_seconds: float = 0.1,
    **debezium: object,
) -> DebeziumEngine:
    """`name` gives the topic prefix: tests sharing a broker use one name each."""
    return standalone_engine(
        name,
        src,
        tgt,
        broker.bootstrap,
        workdir,
        tables,
        debezium={"heartbeat_interval_ms": 1000, **debezium},
        batch_size=batch_size,
        batch_window_seconds=batch_window_seconds,
    )


def fence(engine: DebeziumEngine, src: str, timeout: float = 60) -> None:
    """Wait until the applier has applied everything the source committed so far (a fence marker)."""
    source = connect(src)
    try:
        engine.wait_for_fence(source, timeout=timeout)
    finally:
        source.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, engine: DebeziumEngine | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = ""
            if engine is not None:
                runtime = engine.runtime
                assert isinstance(runtime, LocalChangeStream)
                for part in ("connector", "applier"):
                    log = runtime.workdir / part / "process.log"
                    if log.exists():
                        detail += f"\n--- {part} log tail ---\n" + log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(0.2)


@contextmanager
def running(engine: DebeziumEngine) -> Iterator[DebeziumEngine]:
    try:
        yield engine
    finally:
        engine.teardown()
