"""The cutover protocol as data: its steps, their order, and what a recorded state means.

One protocol moves the writer from an old side to a new side over the replication that
runs old -> new. The cutover runs it source -> target (starting replication back, target ->
source, before the switch); a rollback after cutover runs it target -> source over that back
replication. Once the rollback window has passed, the back replication is retired: the source
first applies the target's writes up to the target's current position, then the back
replication is dropped; from then on a rollback could no longer bring the target's writes
back, so it is refused. Pure: no database or AWS access here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lambdas.core.routers.base import Side


class Operation(StrEnum):
    CUTOVER = "cutover"
    ROLLBACK = "rollback"
    RETIRE_REVERSE = "retire_reverse"  # after the rollback window: the back replication ends


class Step(StrEnum):
    FENCE = "fence"  # router holds clients, old database refuses writes; note the old side's WAL position
    CATCH_UP = "catch_up"  # the new side has applied the old side's WAL up to that position
    SYNC_SEQUENCES = "sync_sequences"  # sequences on the new side at least the old side's + margin
    STOP_REPLICATION = "stop_replication"  # old -> new subscription disabled, its apply worker gone
    START_BACK_REPLICATION = "start_back_replication"  # new -> old, no initial copy (cutover only)
    UNFENCE_NEW = "unfence_new"  # the new database accepts writes (lifts a fence left on it)
    SWITCH_WRITER = "switch_writer"  # the router's writer points at the new side
    RELEASE = "release"  # held clients continue, on the new side
    MOVE_READS = "move_reads"  # all reads on the new side
    RETIRE_REPLICATION = "retire_replication"  # old -> new subscription, slot and publication dropped


class Status(StrEnum):
    RUNNING = "running"
    DONE = "done"
    ABORTED = "aborted"


CUTOVER_STEPS: tuple[Step, ...] = (
    Step.FENCE,
    Step.CATCH_UP,
    Step.SYNC_SEQUENCES,
    Step.STOP_REPLICATION,
    Step.START_BACK_REPLICATION,
    Step.UNFENCE_NEW,
    Step.SWITCH_WRITER,
    Step.RELEASE,
    Step.MOVE_READS,
    Step.RETIRE_REPLICATION,
)
ROLLBACK_STEPS: tuple[Step, ...] = tuple(s for s in CUTOVER_STEPS if s is not Step.START_BACK_REPLICATION)
# Retiring the back replication (target -> source) moves no writer: the source applies the
# target's WAL up to the target's position when the retire began, then the replication is dropped.
RETIRE_STEPS: tuple[Step, ...] = (Step.CATCH_UP, Step.RETIRE_REPLICATION)
STEPS: dict[Operation, tuple[Step, ...]] = {
    Operation.CUTOVER: CUTOVER_STEPS,
    Operation.ROLLBACK: ROLLBACK_STEPS,
    Operation.RETIRE_REVERSE: RETIRE_STEPS,
}

# From this step on the new side may take writes: a failure no longer undoes the attempt, it
# is finished by running the operation again.
POINT_OF_NO_RETURN = Step.UNFENCE_NEW


@dataclass(frozen=True)
class Direction:
    operation: Operation
    old: Side
    new: Side
    steps: tuple[Step, ...]

    @property
    def starts_back_replication(self) -> bool:
        return Step.START_BACK_REPLICATION in self.steps


FORWARD = Direction(Operation.CUTOVER, Side.SOURCE, Side.TARGET, CUTOVER_STEPS)
BACKWARD = Direction(Operation.ROLLBACK, Side.TARGET, Side.SOURCE, ROLLBACK_STEPS)


@dataclass(frozen=True)
class Progress:
    """One operation's recorded state: `step` is the last step completed (None: none yet)."""

    operation: Operation
    status: Status
    attempt: int
    step: Step | None
    fence_lsn: str | None = None
    error: str | None = None

    def completed(self, step: Step) -> bool:
        order = STEPS[self.operation]
        if self.step is None or step not in order:
            return False
        return order.index(step) <= order.index(self.step)

    @property
    def past_point_of_no_return(self) -> bool:
        return self.completed(POINT_OF_NO_RETURN)


def remaining_steps(direction: Direction, progress: Progress | None) -> list[Step]:
    """The steps still to run for `direction`, given what is recorded (a fresh start when aborted)."""
    if progress is None or progress.status is Status.ABORTED:
        return list(direction.steps)
    if progress.status is Status.DONE:
        return []
    return [s for s in direction.steps if not progress.completed(s)]


class RollbackKind(StrEnum):
    NOTHING = "nothing"  # already rolled back
    BEFORE_CUTOVER = "before_cutover"  # the writer never left the source: reads back, forward replication stopped
    AFTER_CUTOVER = "after_cutover"  # the protocol target -> source over the back replication


def rollback_kind(cutover: Progress | None, rollback: Progress | None, router_writer: Side | None) -> RollbackKind:
    """Which rollback fits what is recorded on the target and where the router's writer points.

    The writer counts as moved once the cutover passed its point of no return (the target
    may have taken writes) or the router points at the target whatever is recorded.
    """
    if rollback is not None and rollback.status is Status.DONE:
        return RollbackKind.NOTHING
    if rollback is not None and rollback.status is Status.RUNNING:
        return RollbackKind.AFTER_CUTOVER
    moved = router_writer is Side.TARGET or (
        cutover is not None
        and cutover.status in (Status.RUNNING, Status.DONE)
        and (cutover.status is Status.DONE or cutover.past_point_of_no_return)
    )
    return RollbackKind.AFTER_CUTOVER if moved else RollbackKind.BEFORE_CUTOVER


def rollback_possible(retire: Progress | None) -> bool:
    """Whether the back replication still carries every target write to the source.

    The retire drops it right after recording that the source caught up; from that record on
    a rollback would lose the target's later writes. Before it (a retire that timed out
    waiting, say) the back replication is whole and a rollback still loses nothing.
    """
    return retire is None or not retire.completed(Step.CATCH_UP)


def retire_blocker(cutover: Progress | None, rollback: Progress | None) -> str | None:
    """Why the back replication cannot be retired now; None when it can."""
    if rollback is not None and rollback.status is Status.DONE:
        return "it was rolled back after its cutover (the rollback already dropped the back replication)"
    if rollback is not None and rollback.status is Status.RUNNING:
        return "a rollback after its cutover is under way over the back replication: finish it first"
    if cutover is None or cutover.status is not Status.DONE:
        state = "never started" if cutover is None else cutover.status.value
        return f"its cutover is not done ({state}): the back replication exists only after a cutover"
    return None
