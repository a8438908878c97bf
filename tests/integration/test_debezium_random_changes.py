"""Random changes through the real change stream: the target must end equal to the source.

A seeded generator writes transactions on the source that a hand-written test rarely combines: a
row updated several times in one transaction, a key changed and changed again, two keys swapped,
a row deleted and its key inserted again, keys moved in bulk, ranges updated, a text key changed
in a composite key, NULLs and empty strings, and TOASTed values (random, over 8 kB, so stored out
of line) that most updates leave unchanged, so that Debezium sends its placeholder and the applier
must keep the target's value, also across a key move. The applier folds each batch into net
changes; with batches of 3 events most moves and multi-statement transactions are cut across
batches, with 500 they fold within one.

The answer is the source itself: after the fence, both tables are compared row for row, every
column's text form.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from psycopg2 import sql

from lambdas.core.db import Connection, connect, execute, fetch_all
from lambdas.core.tables import TableName
from rehearsal.broker import Broker
from rehearsal.compare import compare_databases
from tests.integration.stream_env import fence, make_engine, running, wait_until

MAIN = TableName("public", "r_main")
PAIR = TableName("public", "r_pair")
TABLES = (MAIN, PAIR)

SCHEMA = """
CREATE TABLE r_main (k integer PRIMARY KEY, v integer, s text, big text);
CREATE TABLE r_pair (a integer, b text, v integer, big text, PRIMARY KEY (a, b));
"""


class Writer:
    """Random valid changes on the source, one transaction at a time; keeps the tables' keys to choose from."""

    def __init__(self, conn: Connection, rng: random.Random) -> None:
        self.conn = conn
        self.rng = rng
        self.main: set[int] = set()
        self.pair: set[tuple[int, str]] = set()

    # -- values

    def big(self) -> str | None:
        """None, a short text, or about 12 kB of random hex (incompressible enough to be stored out of line)."""
        roll = self.rng.random()
        if roll < 0.15:
            return None
        if roll < 0.5:
            return self.rng.choice(["", "x", "é", "short"])
        return f"{self.rng.getrandbits(48_000):x}"

    def text(self) -> str | None:
        return self.rng.choice([None, "", "a", "b", "ünï", "x" * 40])

    def free_key(self) -> int:
        while True:
            k = self.rng.randint(1, 3000)
            if k not in self.main:
                return k

    def run(self, statement: str, params: tuple[object, ...] = ()) -> None:
        with self.conn.cursor() as cur:
            cur.execute(statement, params)

    # -- r_main

    def insert(self) -> None:
        k = self.free_key()
        self.run("INSERT INTO r_main VALUES (%s, %s, %s, %s)", (k, self.rng.randint(0, 9), self.text(), self.big()))
        self.main.add(k)

    def any_key(self) -> int | None:
        return self.rng.choice(sorted(self.main)) if self.main else None

    def update_value(self) -> None:  # the TOASTed column unchanged: Debezium sends the placeholder
        if (k := self.any_key()) is not None:
            self.run("UPDATE r_main SET v = coalesce(v, 0) + 1, s = %s WHERE k = %s", (self.text(), k))

    def update_big(self) -> None:
        if (k := self.any_key()) is not None:
            self.run("UPDATE r_main SET big = %s WHERE k = %s", (self.big(), k))

    def move(self) -> None:  # a key change, the TOASTed value unchanged (sometimes another column too)
        if (k := self.any_key()) is not None:
            new = self.free_key()
            if self.rng.random() < 0.5:
                self.run("UPDATE r_main SET k = %s WHERE k = %s", (new, k))
            else:
                self.run("UPDATE r_main SET k = %s, v = -1 WHERE k = %s", (new, k))
            self.main.discard(k)
            self.main.add(new)

    def swap(self) -> None:  # two rows trade keys through a third, in one transaction
        if len(self.main) < 2:
            return
        a, b = self.rng.sample(sorted(self.main), 2)
        self.run("UPDATE r_main SET k = -k WHERE k = %s", (a,))
        self.run("UPDATE r_main SET k = %s WHERE k = %s", (a, b))
        self.run("UPDATE r_main SET k = %s WHERE k = %s", (b, -a))

    def delete(self) -> None:
        if (k := self.any_key()) is not None:
            self.run("DELETE FROM r_main WHERE k = %s", (k,))
            self.main.discard(k)

    def delete_and_insert_again(self) -> None:
        if (k := self.any_key()) is not None:
            self.run("DELETE FROM r_main WHERE k = %s", (k,))
            self.run("INSERT INTO r_main VALUES (%s, %s, %s, %s)", (k, 7, self.text(), self.big()))

    def update_range(self) -> None:
        low = self.rng.randint(1, 3000)
        self.run("UPDATE r_main SET v = coalesce(v, 0) * 2 WHERE k BETWEEN %s AND %s", (low, low + 60))

    def move_range(self) -> None:  # many keys change in one statement (to keys above any other)
        low = self.rng.randint(1, 3000)
        moved = sorted(k for k in self.main if low <= k <= low + 40)
        if moved and not {k + 100000 for k in moved} & self.main:
            self.run("UPDATE r_main SET k = k + 100000 WHERE k BETWEEN %s AND %s", (low, low + 40))
            self.main -= set(moved)
            self.main |= {k + 100000 for k in moved}

    def update_twice(self) -> None:
        if (k := self.any_key()) is not None:
            self.run("UPDATE r_main SET v = 1 WHERE k = %s", (k,))
            self.run("UPDATE r_main SET s = %s WHERE k = %s", (self.text(), k))
            self.run(
                "UPDATE r_main SET v = v + 1, big = CASE WHEN v > 5 THEN %s ELSE big END WHERE k = %s", (self.big(), k)
            )

    # -- r_pair (a composite key, its text part changing)

    def pair_insert(self) -> None:
        key = (self.rng.randint(1, 4), self.rng.choice(["", "a", "b", "é", "a b"]) + str(self.rng.randint(0, 300)))
        if key not in self.pair:
            self.run("INSERT INTO r_pair VALUES (%s, %s, %s, %s)", (*key, self.rng.randint(0, 9), self.big()))
            self.pair.add(key)

    def pair_change(self) -> None:
        if not self.pair:
            return
        a, b = self.rng.choice(sorted(self.pair))
        roll = self.rng.random()
        if roll < 0.4:
            new = (a, b + "'")
            if new not in self.pair:
                self.run("UPDATE r_pair SET b = %s WHERE a = %s AND b = %s", (new[1], a, b))
                self.pair.discard((a, b))
                self.pair.add(new)
        elif roll < 0.7:
            self.run("UPDATE r_pair SET v = coalesce(v, 0) + 1 WHERE a = %s AND b = %s", (a, b))
        else:
            self.run("DELETE FROM r_pair WHERE a = %s AND b = %s", (a, b))
            self.pair.discard((a, b))

    def transaction(self) -> None:
        ops = [
            (self.insert, 4),
            (self.update_value, 5),
            (self.update_big, 2),
            (self.move, 3),
            (self.swap, 1),
            (self.delete, 2),
            (self.delete_and_insert_again, 1),
            (self.update_range, 1),
            (self.move_range, 0.3),
            (self.update_twice, 1),
            (self.pair_insert, 2),
            (self.pair_change, 3),
        ]
        chosen = self.rng.choices([op for op, _ in ops], weights=[w for _, w in ops], k=self.rng.randint(1, 8))
        for op in chosen:
            op()
        self.conn.commit()


def _keys(conn: Connection) -> tuple[set[int], set[tuple[int, str]]]:
    main = {int(r[0]) for r in fetch_all(conn, "SELECT k FROM r_main")}
    pair = {(int(a), str(b)) for a, b in fetch_all(conn, "SELECT a, b FROM r_pair")}
    return main, pair


@pytest.mark.parametrize(("seed", "batch_size"), [(1, 3), (2, 500)], ids=["seed1-batches-of-3", "seed2-batches-of-500"])
def test_random_transactions_leave_the_target_equal_to_the_source(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path, seed: int, batch_size: int
) -> None:
    # Given both tables on both sides, 150 random transactions on the source, and the stream started
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        conn = connect(dsn)
        execute(conn, SCHEMA)
        conn.close()
    source = connect(src, autocommit=False)
    writer = Writer(source, random.Random(seed))
    for _ in range(150):
        writer.transaction()
    engine = make_engine(
        src,
        tgt,
        broker,
        tmp_path / "stream",
        TABLES,
        name=f"dbz-rand-{seed}",
        batch_size=batch_size,
        batch_window_seconds=0.05,
    )
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        # When 600 more random transactions stream through
        writer.main, writer.pair = _keys(source)
        for _ in range(600):
            writer.transaction()
        assert _keys(source) == (writer.main, writer.pair)  # the writer's idea of the keys held
        fence(engine, src, timeout=120)
        # Then the target equals the source row for row, every column's text form, with no dead letter
        diffs = [d for d in compare_databases(src, tgt, TABLES) if not d.equal]
        assert diffs == [], diffs
        assert engine.status().dead_letters == 0
    source.close()
    counts = {t: fetch_all_count(src, t) for t in TABLES}
    assert counts[MAIN] > 100 and counts[PAIR] > 50  # the tables were not emptied along the way


def fetch_all_count(dsn: str, table: TableName) -> int:
    conn = connect(dsn)
    try:
        return int(fetch_all(conn, sql.SQL("SELECT count(*) FROM {}").format(table.ident))[0][0])
    finally:
        conn.close()
