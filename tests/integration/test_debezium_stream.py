"""The debezium engine end to end: real PostgreSQL, a real broker, the real Debezium engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lambdas.core.db import connect
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.broker import Broker, start_broker
from rehearsal.compare import compare_databases
from rehearsal.workload import Workload
from tests.integration.stream_env import make_engine, running, wait_until

TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = start_broker()
    try:
        yield b
    finally:
        b.stop()


def given_sample(src: str, tgt: str, rows: int) -> None:
    source, target = connect(src), connect(tgt)
    sample.create_schema(source)
    sample.create_schema(target)
    sample.load_data(source, rows)
    source.close()
    target.close()


def test_snapshot_then_stream_converges_under_writes(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a source with the sample schema and rows, an empty target, and the stream started
    src, tgt = fresh_dbs
    given_sample(src, tgt, 20_000)
    engine = make_engine(src, tgt, broker, tmp_path / "stream", TABLES)
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        # When writers insert, update and delete for a while
        workload = Workload(src, clients=3).start()
        wait_until(lambda: (engine.status().pending_events or 0) > 0 or True, 5, "changes")
        import time

        time.sleep(4)
        workload.stop()
        source = connect(src)
        try:
            reached = engine.wait_for_fence(source, timeout=60)
        finally:
            source.close()
        # Then the target equals the source row for row
        diffs = [d for d in compare_databases(src, tgt, TABLES) if not d.equal]
        assert diffs == [], diffs
        status = engine.status()
        assert status.dead_letters == 0
        assert status.pending_events == 0
        assert reached.waited_seconds < 60
