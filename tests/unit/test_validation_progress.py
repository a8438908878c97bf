"""Progress within a chunk: the command line's line (chunks done, what the longest-running chunk is doing
now) and the chunk Lambda's step log."""

from __future__ import annotations

import io
import time
from typing import Any

from lambdas.core.validation import ChunkResult, ChunkStep
from lambdas.handlers.validate_chunk import StepLog
from rehearsal.validate import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(name: str, done: int, total: int | None, *, chunk: int = 0, unit: str = "rows") -> ChunkStep:
    return ChunkStep("public.events", chunk, 2, name, done, total, unit)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_running_chunk_shows_its_step_and_how_far_it_is_and_goes_once_its_result_arrives() -> None:
    # Given progress on a pipe (a line every 2 s at most) and one chunk starting its bucket scan
    stream, clock = io.StringIO(), Clock()
    progress = Progress(stream, enabled=True, clock=clock)
    progress.step(step("key buckets", 0, None))
    # Then the line names the chunk and its step, with no count for a scan that tells none
    assert lines(stream)[-1].endswith(
        "0/0 chunks, 0 rows, 0 difference(s), 0 rows/s; now public.events chunk 1/2 (0s): key buckets"
    )
    # When it streams rows within 2 s: no new line; after 3 s: the rows so far of the total
    clock.now += 1
    progress.step(step("rows of differing buckets", 500, 1_000))
    assert len(lines(stream)) == 1
    clock.now += 2
    progress.step(step("rows of differing buckets", 900, 1_000))
    assert lines(stream)[-1].endswith("now public.events chunk 1/2 (3s): rows of differing buckets, 900/1,000 rows")
    # When its result arrives (the last chunk): a final line, with no chunk running
    progress.chunk(ChunkResult(table="public.events", chunk=0, chunks=1, source_rows=1_000), 1, 1)
    assert lines(stream)[-1].startswith("[   3.0s] 1/1 chunks, 1,000 rows") and "now" not in lines(stream)[-1]
    assert progress.running == {}


def test_the_line_shows_the_chunk_running_longest() -> None:
    # Given chunk 2 running since t=0 and chunk 1 since t=5
    stream, clock = io.StringIO(), Clock()
    progress = Progress(stream, enabled=True, clock=clock)
    progress.step(step("key ranges", 0, 40, chunk=1, unit="slices"))
    clock.now += 5
    progress.step(step("key ranges", 3, 40, chunk=0, unit="slices"))
    clock.now += 2
    progress.step(step("key ranges", 7, 40, chunk=0, unit="slices"))
    # Then the line follows chunk 2, and chunk 1's later steps keep its start
    assert progress.line().endswith("now public.events chunk 2/2 (7s): key ranges, 0/40 slices")
    progress.chunk(ChunkResult(table="public.events", chunk=1, chunks=2, source_rows=10), 1, 2)
    assert progress.line().endswith("now public.events chunk 1/2 (2s): key ranges, 7/40 slices")


def test_while_a_step_runs_quietly_the_line_is_redrawn_and_stops_with_the_block() -> None:
    # Given a chunk in a long scan that reports nothing, and a redraw every 10 ms
    stream = io.StringIO()
    progress = Progress(stream, enabled=True)
    progress.interval = 0.01
    with progress:
        progress.step(step("key buckets", 0, None))
        deadline = time.monotonic() + 10
        while len(lines(stream)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Then the line is drawn again and again, with nothing new reported
        assert len(lines(stream)) >= 4 and all("key buckets" in line for line in lines(stream))
    # And once the block ends, nothing more is drawn
    assert progress._ticker is not None and not progress._ticker.is_alive()
    drawn = len(lines(stream))
    time.sleep(0.05)
    assert len(lines(stream)) == drawn


def test_disabled_progress_prints_nothing_and_starts_no_thread() -> None:
    stream = io.StringIO()
    with Progress(stream, enabled=False) as progress:
        progress.step(step("key buckets", 0, None))
        progress.chunk(ChunkResult(table="public.events", chunk=0, chunks=1), 1, 1)
    assert stream.getvalue() == "" and progress._ticker is None


def test_the_chunk_function_logs_each_new_step_and_a_running_one_every_30_s() -> None:
    # Given a step log over a fake clock
    logged: list[dict[str, Any]] = []
    clock = Clock()
    log = StepLog(lambda message, extra: logged.append({"message": message, **extra}), clock=clock)
    # When a bucket scan starts, rows stream for 40 s, then the differing rows are read
    log(step("key buckets", 0, None))
    for second in range(1, 41):
        clock.now += 1
        log(step("rows of differing buckets", second * 1_000, 40_000))
    log(step("differing rows", 0, 12, unit="keys"))
    # Then each step is logged when it starts, the stream again after 30 s, with counts and no keys
    assert [(e["step"], e["done"], e["total"]) for e in logged] == [
        ("key buckets", 0, None),
        ("rows of differing buckets", 1_000, 40_000),
        ("rows of differing buckets", 31_000, 40_000),
        ("differing rows", 0, 12),
    ]
    assert {e["message"] for e in logged} == {"validation chunk step"}
    assert set(logged[0]) == {"message", "table", "chunk", "step", "done", "total", "unit"}
