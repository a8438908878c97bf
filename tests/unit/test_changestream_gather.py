"""How the consume loop gathers a batch (lambdas/core/changestream/consumer.gather): full batches
from a backlog at once, a partial one without waiting out the window, a first record waited for."""

from __future__ import annotations

from lambdas.core.changestream.consumer import GATHER_IDLE_SECONDS, gather


class FakeConsumer:
    """A consumer whose fetched messages arrive in the given waves: each consume call that waits
    (timeout > 0) receives the next wave; every call is recorded as (num_messages, timeout)."""

    def __init__(self, held: int, waves: list[int]) -> None:
        self.held = list(range(held))
        self.waves = list(waves)
        self.calls: list[tuple[int, float]] = []
        self.next = held

    def consume(self, num_messages: int, timeout: float) -> list[int]:
        self.calls.append((num_messages, timeout))
        if not self.held and timeout > 0 and self.waves:
            wave = self.waves.pop(0)
            self.held = list(range(self.next, self.next + wave))
            self.next += wave
        out, self.held = self.held[:num_messages], self.held[num_messages:]
        return out


def test_a_backlog_gives_a_full_batch_without_waiting() -> None:
    # Given 5,000 messages already fetched
    consumer = FakeConsumer(held=5000, waves=[])
    # When a batch of 2,000 is gathered
    batch = gather(consumer, 2000, window_seconds=1.0)
    # Then it is full, taken in one call that did not wait
    assert batch == list(range(2000))
    assert consumer.calls == [(2000, 0)]


def test_the_end_of_a_backlog_is_not_held_back_for_the_window() -> None:
    # Given 300 messages fetched and nothing more coming
    consumer = FakeConsumer(held=300, waves=[])
    # When a batch of 2,000 is gathered with a 1 s window
    batch = gather(consumer, 2000, window_seconds=1.0)
    # Then the 300 are returned after one short wait for more, not after the window
    assert batch == list(range(300))
    assert consumer.calls == [(2000, 0), (1700, GATHER_IDLE_SECONDS)]


def test_an_idle_stream_waits_for_its_first_record_then_takes_what_follows_it() -> None:
    # Given nothing fetched yet; then one message arrives, then 40 right behind it, then nothing
    consumer = FakeConsumer(held=0, waves=[1, 40])
    # When a batch is gathered
    batch = gather(consumer, 500, window_seconds=1.0)
    # Then it waited (up to the window) for the first, took the 40 that followed, and stopped when idle
    assert batch == list(range(41))
    (first_n, first_t), (wait_n, wait_t), *rest = consumer.calls
    assert (first_n, first_t) == (500, 0)
    assert wait_n == 1 and 0 < wait_t <= 1.0
    assert all(timeout <= GATHER_IDLE_SECONDS for _, timeout in rest)
