"""A read-shift step against a rollback, on real servers and pgbouncer: the two take turns (the
migration's lock on the target), and a step of an execution that started before a rollback is
refused, so a stopped execution's read shift can never undo where the rollback put the reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cutover_env import Shop, shop_in

from lambdas.core.cutover.readshift import ReadShiftRefused, shift_reads
from lambdas.core.db import connect
from lambdas.core.routers.base import Side
from lambdas.core.routers.pgbouncer import PgbouncerRouter
from rehearsal.servers import PostgresServer


@pytest.fixture
def shop(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    with shop_in(pg_pair, fresh_dbs) as s:
        yield s


def now() -> datetime:
    return datetime.now(UTC)


def shift(shop: Shop, percent: int, started: datetime | None, router: PgbouncerRouter | None = None) -> None:
    target = connect(shop.tgt)
    try:
        shift_reads(target, router or shop.router, "shop", percent, execution_started=started)
    finally:
        target.close()


class SlowRouter(PgbouncerRouter):
    """The pgbouncer router whose weight change takes a while (as Route53's wait for INSYNC does)."""

    def __init__(self, inner: PgbouncerRouter, seconds: float) -> None:
        self.__dict__.update(inner.__dict__)
        self.seconds = seconds

    def set_read_weight(self, target_percent: int) -> None:
        time.sleep(self.seconds)
        super().set_read_weight(target_percent)


def test_a_read_shift_of_an_execution_started_before_a_rollback_is_refused(shop: Shop) -> None:
    # Given an execution that started, shifted half the reads, then a rollback (the alarm's) put them back
    started = now() - timedelta(seconds=5)
    shift(shop, 50, started)
    assert shop.router.state().read_weight == 50
    shop.runner().rollback()
    assert shop.router.state().read_weight == 0
    # When that execution's next step runs anyway (its invocation was under way when it was stopped)
    with pytest.raises(ReadShiftRefused, match="reads stay where the rollback put them"):
        shift(shop, 100, started)
    # Then the reads stay on the source
    assert shop.router.state().read_weight == 0
    # And a new execution, started after the rollback, may shift them again
    shift(shop, 10, now() + timedelta(seconds=1))
    assert shop.router.state().read_weight == 10


def test_a_rollback_waits_for_a_read_shift_under_way_and_has_the_last_word(shop: Shop) -> None:
    # Given a read shift whose weight change takes 1.5 s, under way
    started = now() - timedelta(seconds=5)
    slow = SlowRouter(shop.router, 1.5)
    shifting = threading.Thread(target=shift, args=(shop, 100, started, slow))
    shifting.start()
    time.sleep(0.3)
    # When the alarm's rollback arrives meanwhile
    began = time.monotonic()
    result = shop.runner().rollback()
    shifting.join()
    # Then it waited for the shift, and the reads end where the rollback put them: on the source
    assert time.monotonic() - began >= 1.0
    assert result.kind == "before_cutover" and result.status == "done"
    state = shop.router.state()
    assert (state.read_weight, state.writer) == (0, Side.SOURCE)
