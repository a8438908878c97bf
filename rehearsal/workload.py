"""A live write workload against the sample schema, for the rehearsal and the tests.

Each client runs short transactions (new order with items, status and total updates,
customer profile edits, event inserts and deletes) on its own connection and records
every attempt's latency and outcome, so a test or report can show failed transactions
and the longest pause.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2.errorcodes import READ_ONLY_SQL_TRANSACTION

from lambdas.core.db import Connection, connect


@dataclass
class WorkloadStats:
    committed: int = 0
    failed: int = 0
    refused_read_only: int = 0  # of the failed: refused by a read-only database (a migration's write fence)
    errors: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)
    order_ids: list[int] = field(default_factory=list)  # orders whose insert committed: must never be lost
    failed_starts: list[float] = field(default_factory=list)  # start times of the failed attempts
    # committed updates and deletes, so that losing one can be told (not only lost inserts):
    order_increments: list[tuple[int, str]] = field(default_factory=list)  # (order id, total after it)
    deleted_events: list[str] = field(default_factory=list)  # events whose delete committed
    # the rows a committed new order inserted with it: (order id, order_items lines, its events row)
    order_children: list[tuple[int, int, str]] = field(default_factory=list)
    in_flight: float | None = None  # start of the attempt now running (one client's stats only)

    def merge(self, other: WorkloadStats) -> None:
        self.committed += other.committed
        self.failed += other.failed
        self.refused_read_only += other.refused_read_only
        self.errors += other.errors[:20]
        self.latencies += other.latencies
        self.order_ids += other.order_ids
        self.failed_starts += other.failed_starts
        self.order_increments += other.order_increments
        self.deleted_events += other.deleted_events
        self.order_children += other.order_children

    @property
    def max_latency(self) -> float:
        return max((lat for _, lat in self.latencies), default=0.0)


def _new_order(
    cur: psycopg2.extensions.cursor, rng: random.Random, max_customer: int, max_product: int
) -> tuple[int, int, str]:
    """Inserts an order, its items and its 'created' event; returns (order id, lines, event id)."""
    cur.execute(
        "INSERT INTO orders (customer_id, status, total, note) VALUES (%s, 'new', %s, %s) RETURNING id",
        (rng.randint(1, max_customer), round(rng.uniform(1, 500), 2), rng.choice([None, "", "rush – ünïcødé"])),
    )
    row = cur.fetchone()
    assert row is not None
    lines = rng.randint(1, 3)
    for line in range(1, lines + 1):
        cur.execute(
            "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price) VALUES (%s, %s, %s, %s, %s)",
            (row[0], line, rng.randint(1, max_product), rng.randint(1, 4), round(rng.uniform(1, 99), 2)),
        )
    cur.execute(
        "INSERT INTO events (order_id, kind, payload) VALUES (%s, 'created', %s::jsonb) RETURNING id::text",
        (row[0], '{"source": "workload"}'),
    )
    event = cur.fetchone()
    assert event is not None
    return int(row[0]), lines, str(event[0])


def _update_order(cur: psycopg2.extensions.cursor, rng: random.Random, max_order: int) -> tuple[int, str] | None:
    cur.execute(
        "UPDATE orders SET status = %s, total = total + 1 WHERE id = %s RETURNING id, total::text",
        (rng.choice(["paid", "shipped", "cancelled"]), rng.randint(1, max_order)),
    )
    row = cur.fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _update_customer(cur: psycopg2.extensions.cursor, rng: random.Random, max_customer: int) -> None:
    cur.execute(
        "UPDATE customers SET profile = jsonb_set(profile, '{visits}', to_jsonb(%s::int)) WHERE id = %s",
        (rng.randint(1, 1000), rng.randint(1, max_customer)),
    )


def _delete_event(cur: psycopg2.extensions.cursor, rng: random.Random) -> list[str]:
    cur.execute(
        "DELETE FROM events WHERE id = (SELECT id FROM events TABLESAMPLE SYSTEM (0.1) LIMIT 1) RETURNING id::text"
    )
    return [str(row[0]) for row in cur.fetchall()]


class Workload:
    """`clients` threads writing until `stop()`; `rate` caps transactions per second per client."""

    def __init__(
        self,
        dsn: str | Callable[[], str],
        *,
        clients: int = 4,
        rate: float | None = None,
        seed: int = 7,
        connector: Callable[..., Connection] = connect,
    ) -> None:
        self._dsn = dsn
        self._clients = clients
        self._rate = rate
        self._seed = seed
        self._connect = connector
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stats: list[WorkloadStats] = []

    def start(self) -> Workload:
        probe = self._connect(self._current_dsn())
        try:
            with probe.cursor() as cur:
                cur.execute(
                    "SELECT (SELECT max(id) FROM customers), (SELECT max(id) FROM products), (SELECT max(id) FROM orders)"
                )
                row = cur.fetchone()
                assert row is not None
                limits = tuple(int(v or 1) for v in row)
        finally:
            probe.close()
        for i in range(self._clients):
            stats = WorkloadStats()
            self._stats.append(stats)
            thread = threading.Thread(target=self._run, args=(i, stats, limits), name=f"workload-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _current_dsn(self) -> str:
        return self._dsn() if callable(self._dsn) else self._dsn

    def _run(self, index: int, stats: WorkloadStats, limits: tuple[int, ...]) -> None:
        rng = random.Random(self._seed * 1000 + index)  # noqa: S311 - reproducible load, not crypto
        max_customer, max_product, max_order = limits
        conn: Connection | None = None
        interval = 1.0 / self._rate if self._rate else 0.0
        while not self._stop.is_set():
            began = time.monotonic()
            stats.in_flight = began
            try:
                if conn is None or conn.closed:
                    conn = self._connect(self._current_dsn(), application_name=f"workload-{index}", autocommit=False)
                new_order: tuple[int, int, str] | None = None
                increment: tuple[int, str] | None = None
                deleted: list[str] = []
                with conn.cursor() as cur:
                    kind = rng.random()
                    if kind < 0.4:
                        new_order = _new_order(cur, rng, max_customer, max_product)
                    elif kind < 0.7:
                        increment = _update_order(cur, rng, max_order)
                    elif kind < 0.9:
                        _update_customer(cur, rng, max_customer)
                    else:
                        deleted = _delete_event(cur, rng)
                conn.commit()
                stats.committed += 1
                if new_order is not None:
                    stats.order_ids.append(new_order[0])
                    stats.order_children.append(new_order)
                if increment is not None:
                    stats.order_increments.append(increment)
                stats.deleted_events += deleted
            except (psycopg2.Error, ConnectionError) as exc:
                stats.failed += 1
                if getattr(exc, "pgcode", None) == READ_ONLY_SQL_TRANSACTION:
                    stats.refused_read_only += 1
                stats.failed_starts.append(began)
                if len(stats.errors) < 20:
                    stats.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                if conn is not None:
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        conn.close()
                time.sleep(0.01)
            stats.latencies.append((began, time.monotonic() - began))
            stats.in_flight = None
            if interval:
                time.sleep(max(0.0, interval - (time.monotonic() - began)))
        if conn is not None:
            conn.close()

    def stop(self, *, wait_seconds: float = 30) -> WorkloadStats:
        """Stop the writers; one still waiting for the database after `wait_seconds` counts as failed."""
        self._stop.set()
        deadline = time.monotonic() + wait_seconds
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        total = WorkloadStats()
        for thread, stats in zip(self._threads, self._stats, strict=True):
            began = stats.in_flight
            if thread.is_alive() and began is not None:
                # Still waiting for the database when the writers stopped: a pause that never ended,
                # and a failed transaction (it did not commit while it was measured).
                stats.failed += 1
                stats.failed_starts.append(began)
                stats.errors.append("a transaction was still waiting when the writers stopped")
                stats.latencies.append((began, time.monotonic() - began))
            total.merge(stats)
        return total


def _run_in_child(dsn: str, clients: int, rate: float | None, seed: int, stop: Any, results: Any) -> None:
    workload = Workload(dsn, clients=clients, rate=rate, seed=seed).start()
    results.put("started")
    stop.wait()
    results.put(workload.stop())


class WorkloadProcess:
    """The same workload in a child process, so that what it measures (latency, pauses) is not
    inflated by work in this process (the state machine interpreter, handlers, monitors)."""

    def __init__(self, dsn: str, *, clients: int = 4, rate: float | None = None, seed: int = 7) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results: Any = context.Queue()
        self._process = context.Process(
            target=_run_in_child, args=(dsn, clients, rate, seed, self._stop, self._results), daemon=True
        )

    def start(self) -> WorkloadProcess:
        self._process.start()
        first = self._results.get(timeout=60)
        if first != "started":  # pragma: no cover - the child sends nothing else first
            raise RuntimeError(f"workload process did not start: {first!r}")
        return self

    def stop(self) -> WorkloadStats:
        self._stop.set()
        stats: WorkloadStats = self._results.get(timeout=120)
        self._process.join(timeout=30)
        return stats
