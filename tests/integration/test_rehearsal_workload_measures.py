"""The workload's own figures: a write blocked until the writers stop is a pause (it once went
unrecorded), and the throughput chart counts commits only (it once counted failed attempts)."""

from __future__ import annotations

import time

from lambdas.core.db import connect, execute
from rehearsal import sample
from rehearsal.__main__ import _buckets
from rehearsal.workload import Workload


def _shop(dsn: str) -> None:
    conn = connect(dsn)
    sample.create_schema(conn)
    sample.load_data(conn, 2000)
    conn.close()


def test_a_write_blocked_until_the_writers_stop_counts_as_a_pause(fresh_dbs: tuple[str, str]) -> None:
    src, _ = fresh_dbs
    _shop(src)
    workload = Workload(src, clients=1, rate=50).start()
    time.sleep(0.5)
    # Writes are blocked (e.g. a router left paused, a fence never lifted) until the writers stop
    locker = connect(src, autocommit=False)
    execute(locker, "LOCK TABLE orders, order_items, customers, events IN EXCLUSIVE MODE")
    blocked_from = time.monotonic()
    time.sleep(3)
    stats = workload.stop(wait_seconds=1)  # the writer still waiting then counts as failed
    blocked_for = time.monotonic() - blocked_from
    locker.rollback()
    locker.close()
    # The writers could not write for `blocked_for` seconds: the figures must show it
    assert stats.max_latency >= 3 or stats.failed > 0, (blocked_for, stats.max_latency, stats.failed)


def test_the_throughput_chart_counts_only_committed_transactions(fresh_dbs: tuple[str, str]) -> None:
    src, _ = fresh_dbs
    _shop(src)
    workload = Workload(src, clients=2, rate=50).start()
    time.sleep(1)
    conn = connect(src)
    for t in ("orders", "customers", "events"):  # from now on every transaction fails
        execute(conn, f"ALTER TABLE {t} RENAME TO {t}_gone")
    conn.close()
    time.sleep(2)
    stats = workload.stop()
    tps, _, _ = _buckets(stats.latencies, stats.failed_starts)
    charted = sum(v for _, v in tps)
    assert stats.failed > 0
    assert charted == stats.committed
