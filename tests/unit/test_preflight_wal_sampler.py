"""The preflight's WAL-rate sample runs across its other reads: it waits only for what of its seconds is left."""

from __future__ import annotations

from typing import Any

import pytest

from lambdas.core.lsn import Lsn
from lambdas.core.preflight import facts
from lambdas.core.preflight.facts import WalSampler


class Clock:
    """A clock that moves only when told (the other reads) or slept on (the sampler)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def positions(monkeypatch: pytest.MonkeyPatch) -> list[Lsn]:
    """The source's WAL positions the sampler reads, in order (no server: the read is replaced)."""
    queue = [Lsn.parse("0/1000000"), Lsn.parse("0/1100000")]

    def current_lsn(conn: Any) -> Lsn:
        return queue.pop(0)

    monkeypatch.setattr(facts, "current_lsn", current_lsn)
    return queue


@pytest.mark.parametrize(("other_reads", "waited"), [(0.3, [0.7]), (1.0, []), (2.5, [])])
def test_the_sample_waits_only_for_what_the_other_reads_left_of_its_second(
    positions: list[Lsn], other_reads: float, waited: list[float]
) -> None:
    # Given a sample of 1 s started before the other reads
    clock = Clock()
    sampler = WalSampler(conn=None, seconds=1.0, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    sampler.start()
    # When the other reads take `other_reads` seconds and the sample is finished
    clock.now += other_reads
    sample = sampler.finish()
    # Then it slept only the rest of its second (nothing once the reads took longer), and the rate is over the
    # whole time between its two readings
    assert clock.slept == pytest.approx(waited)
    assert sample.seconds == pytest.approx(max(1.0, other_reads))
    assert sample.bytes_per_second == pytest.approx(0x100000 / max(1.0, other_reads))
    assert positions == []
