"""One step of the read shift, in turn with cutover, rollback and retire (the migration's lock on
the target), and refused once a rollback has started since its execution did.

Why: an alarm stops the execution and starts a rollback, but a ShiftReads invocation already
running goes on; were it to set its weights after the rollback put every read back on the
source, reads would stay partly on the target. Holding the lock while the weights change orders
the two; the rollback's record (`store.note_rollback`) tells a later step of the stopped
execution not to move reads again.
"""

from __future__ import annotations

from datetime import datetime

from lambdas.core.cutover import store
from lambdas.core.cutover.runner import CutoverError
from lambdas.core.db import Connection
from lambdas.core.fence import is_fenced, make_writable, set_fence
from lambdas.core.routers.base import TrafficRouter

READ_SHIFT_LOCK_WAIT_SECONDS = 60.0  # a rollback or a cutover holding the lock: both should not be running now


class ReadShiftRefused(CutoverError):
    """A rollback started after this execution did: reads stay where the rollback put them."""


def shift_reads(
    target: Connection,
    router: TrafficRouter,
    migration: str,
    percent: int,
    *,
    execution_started: datetime | None,
    wait_seconds: float = READ_SHIFT_LOCK_WAIT_SECONDS,
) -> None:
    """Send `percent` of reads to the target. `execution_started`: when the execution asking began (None:
    not from a state machine, nothing to compare with)."""
    if not store.try_lock(target, migration, wait_seconds=wait_seconds):
        raise CutoverError(
            f"a cutover, rollback or retire of {migration!r} has been running for more than {wait_seconds:g} s; "
            "reads were not moved"
        )
    try:
        last = store.last_rollback(target, migration)
        if execution_started is not None and last is not None and last >= execution_started:
            raise ReadShiftRefused(
                f"a rollback of {migration!r} started at {last.isoformat()}, after this execution did "
                f"({execution_started.isoformat()}): reads stay where the rollback put them; nothing was changed"
            )
        if percent > 0 and store.target_fence_kept(target, migration):
            make_writable(target)  # the fence kept from an earlier attempt is this read shift's now
            store.forget_target_fence(target, migration)
        if percent > 0 and not is_fenced(target):
            # Before the cutover the target is a replica: a write reaching it through the reader path
            # would never travel back to the source (lost on a rollback). Read-only by default from
            # here on; the apply worker still applies, the cutover lifts it at unfence_new.
            set_fence(target)
        router.set_read_weight(percent)
    finally:
        store.unlock(target, migration)
