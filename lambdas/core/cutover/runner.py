"""Cutover and rollback: moving the writer between source and target without losing a write.

The cutover (source -> target), each step idempotent and recorded on the target when done:

1. fence: the router holds its clients and the source refuses writes from every other
   session (`lambdas.core.fence`); the source's WAL position after the fence is recorded.
2. catch up: wait until the target has applied the source's WAL up to that position.
3. sequences: the target's sequences are moved to at least the source's + margin.
4. stop replication: the forward subscription is disabled and its apply worker ended.
5. start back replication target -> source: a subscription on the source, no initial copy,
   with a new slot on the target (its publication is made before the fence: waiting for the
   tables' locks never lengthens the pause, and a lock held too long stops the cutover unchanged).
6. unfence new: the target accepts writes (lifts a fence a rollback may have left there).
7. switch writer: the router points the writer at the target.
8. release: held clients continue - on the target.
9. move reads: all reads on the target.
10. retire: the forward subscription, its slot and publication are dropped.

No loops without PostgreSQL 16's `origin = none`: the back replication's slot is created
(step 5) only after the forward apply worker has stopped (step 4), so nothing the forward
subscription applied to the target is ever decoded by it; and the forward slot is never read
again after step 4 (dropped in step 10), so changes applied to the source by the back
replication never travel forward. The order of the steps is what prevents the loop.

A failure before step 6 undoes the attempt (back replication dropped, forward replication
enabled again, fence lifted, clients released on the source) and raises `CutoverAborted`;
the source is writable and replication running, ready for another attempt; but a lost
connection (a server crashed or restarting) is left as it is, fenced, for the task's retry to
resume (`_interrupted`): the undo would need that server too. From step 6
on the target may take writes, so a failure is finished, not undone: run it again and it
resumes at the first step not recorded. A process that dies (a Lambda timeout) records
nothing more; the next invocation resumes the same way, re-asserting the fence first.

Rollback after cutover runs the same protocol target -> source over the back replication
(without starting another replication), then drops both replications; every write made on
the target is applied on the source before the writer moves back, and the source's
sequences are moved past the target's. The target stays fenced (read-only), so a client
that still reaches it (a cached DNS answer) cannot write there. Rollback before cutover
(the writer never left the source) undoes a running attempt, moves reads back to the
source and stops forward replication; it needs nothing from the target, so it also works
when the target is down.

Retiring the back replication (`retire_reverse`, once the rollback window has passed): the
target's current WAL position is noted, the source applies the target's writes up to it
over the back replication (so the old source is left whole as of that moment), then the
back subscription, its slot and publication are dropped. Both steps are recorded like the
cutover's, so a re-run resumes or returns `already_done`. Once the catch-up is recorded a
rollback is refused: without the back replication it would lose the target's later writes.
The source stays fenced (read-only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import psycopg2
from psycopg2 import sql

from lambdas.core.catalog import list_tables
from lambdas.core.config import Cutover as CutoverSettings
from lambdas.core.config import LogicalSettings, Migration
from lambdas.core.cutover import store
from lambdas.core.cutover.steps import (
    BACKWARD,
    FORWARD,
    POINT_OF_NO_RETURN,
    RETIRE_STEPS,
    STEPS,
    Direction,
    Operation,
    Progress,
    RollbackKind,
    Status,
    Step,
    remaining_steps,
    retire_blocker,
    rollback_kind,
    rollback_possible,
)
from lambdas.core.db import Connection, DatabaseUnreachable, connect, connection_lost, execute, fetch_all
from lambdas.core.engines.base import FenceReached, Phase, ReplicationStatus, StartResult, TeardownResult
from lambdas.core.engines.logical import (
    LogicalEngine,
    LogicalReplicationPlan,
    ReplicationNames,
    ReplicationSetupError,
    _subscription,
)
from lambdas.core.engines.table_locks import TableLocksBusy
from lambdas.core.fence import (
    Backend,
    end_backends,
    fence_position,
    is_fenced,
    lift_fence,
    make_writable,
    take_fence,
)
from lambdas.core.lsn import Lsn, LsnWaitTimeout, current_lsn, wait_for_lsn
from lambdas.core.routers.base import Side, TrafficRouter
from lambdas.core.schema_compare import Sides
from lambdas.core.sequences import sync_sequences
from lambdas.core.tables import TableName, select_tables

# How long a rollback waits for a running cutover or retire (the Cutover function has 15 minutes: this
# leaves 10 for the rollback itself).
ROLLBACK_LOCK_WAIT_SECONDS = 300.0


class CutoverError(RuntimeError):
    pass


class OperationBusy(CutoverError):
    """Another cutover, rollback or retire of the migration holds its lock: nothing was changed, try again."""


class CutoverNotReady(CutoverError):
    """Refused before anything changed (replication not streaming, lag too high, ...)."""


class CutoverAborted(CutoverError):
    """The attempt failed and was undone: the old side is writable and clients continue there."""


class RollbackError(CutoverError):
    pass


class ReverseReplicationBehind(CutoverError):
    """The source did not catch up with the target in time: nothing was dropped, rollback is still possible."""


@dataclass(frozen=True)
class CutoverPlan:
    migration: str
    tables: tuple[TableName, ...]
    forward: ReplicationNames
    reverse: ReplicationNames
    settings: CutoverSettings = field(default_factory=CutoverSettings)
    logical: LogicalSettings = field(default_factory=LogicalSettings)
    max_lag_bytes: int | None = None
    # The file's table patterns (include, exclude): the rollback window selects the target's tables anew with
    # them, so a table the application creates there after the cutover is seen; None: `tables` only
    patterns: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @classmethod
    def for_migration(cls, migration: Migration, tables: Sequence[TableName]) -> CutoverPlan:
        base = migration.slot_name
        return cls(
            migration.name,
            tuple(tables),
            ReplicationNames(base),
            ReplicationNames(base + "_rev"),
            migration.cutover,
            migration.engine.logical,
            migration.lag.max_bytes,
            (tuple(migration.tables.include), tuple(migration.tables.exclude)),
        )


class ForwardChangeStream(Protocol):
    """The forward replication when it is not native logical replication (engines debezium and dms)."""

    def status(self) -> ReplicationStatus: ...
    def own_source_sessions(self, source: Connection) -> list[Backend]: ...
    def wait_for_fence(self, source: Connection, timeout: float) -> FenceReached: ...
    def start(self) -> StartResult: ...
    def stop(self) -> None: ...
    def pause_applying(self) -> None: ...
    def teardown(self) -> TeardownResult: ...


StepHook = Callable[[Operation, Step], None]


@dataclass
class Hooks:
    """Called around each step's record: tests interrupt here, reports take snapshots."""

    before_record: StepHook | None = None  # the step's effect is in place, not yet recorded
    after_record: StepHook | None = None


@dataclass(frozen=True)
class StepRun:
    step: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OperationResult:
    migration: str
    operation: str
    kind: str  # cutover | after_cutover | before_cutover | nothing
    status: str  # done | already_done
    attempt: int | None = None
    fence_lsn: str | None = None
    pause_seconds: float | None = None  # router held / writes fenced, fence to release
    steps: list[StepRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RollbackReadiness:
    """Whether a rollback after the cutover could run now, over the back replication (target -> source)."""

    applies: bool  # the writer moved and the back replication is kept: the rollback window
    problems: list[str] = field(default_factory=list)  # why a rollback would be refused or would lose time
    lag_bytes: int | None = None
    retained_wal_bytes: int | None = None  # held on the target by the back replication's slot

    @property
    def ready(self) -> bool:
        return self.applies and not self.problems

    @classmethod
    def unreachable(cls, exc: DatabaseUnreachable) -> RollbackReadiness:
        """A database that cannot be reached: reported as why a rollback could not run, never raised (the
        rollback window's gate must not roll back for it; the DSN in the message is redacted)."""
        return cls(applies=True, problems=[f"a rollback could not run: {_first_line(exc)}"])


def lag_problem(what: str, status: ReplicationStatus, max_lag_bytes: int | None) -> str | None:
    """Why the replication lags too far for a fence to wait for it (None when it does not, or when the
    engine reports no byte lag: DMS, gated in seconds by the state machine)."""
    if max_lag_bytes is None or status.engine == "dms":
        return None
    if status.lag_bytes is not None and status.lag_bytes <= max_lag_bytes:
        return None
    return f"{what} lags {status.lag_bytes} bytes, above lag.max_bytes ({max_lag_bytes})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CutoverRunner:
    """Runs the cutover and the rollback of one migration; safe to call again after any failure."""

    def __init__(
        self,
        source_dsn: str,
        target_dsn: str,
        router: TrafficRouter,
        plan: CutoverPlan,
        *,
        target_conninfo: str | None = None,
        connector: Callable[..., Connection] = connect,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        forward_stream: ForwardChangeStream | None = None,
    ) -> None:
        self._dsn = {Side.SOURCE: source_dsn, Side.TARGET: target_dsn}
        # Source -> target by a change stream instead of a subscription: the cutover waits for, stops,
        # resumes and retires it; the back replication is native logical replication either way.
        self.forward_stream = forward_stream
        # How the other server reaches each side, for a subscription's CONNECTION.
        self._conninfo = {Side.SOURCE: source_dsn, Side.TARGET: target_conninfo or target_dsn}
        self.router = router
        self.plan = plan
        self._connect = connector
        self.hooks = hooks or Hooks()
        self._clock = clock

    # -- connections -----------------------------------------------------------------------
    def _writable_connect(self, dsn: str, **kwargs: Any) -> Connection:
        conn = self._connect(dsn, **kwargs)
        if "connection_factory" not in kwargs:
            make_writable(conn)
        return conn

    def _open(self, side: Side) -> Connection:
        return self._writable_connect(self._dsn[side], application_name="zdm-cutover")

    @contextmanager
    def _sessions(self, *, lock: bool = True, wait_seconds: float = 0.0) -> Iterator[dict[Side, Connection]]:
        conns: dict[Side, Connection] = {}
        locked = False
        try:
            conns[Side.TARGET] = self._open(Side.TARGET)
            if lock and not store.try_lock(conns[Side.TARGET], self.plan.migration, wait_seconds=wait_seconds):
                waited = f" for more than {wait_seconds:g} s" if wait_seconds > 0 else ""
                raise OperationBusy(
                    f"another cutover, rollback or retire of {self.plan.migration!r} has been running{waited} (it "
                    "holds the lock on the target); nothing was changed: run this again once it has finished"
                )
            locked = lock
            conns[Side.SOURCE] = self._open(Side.SOURCE)
            yield conns
        finally:
            if locked:
                # Released before the close returns: a closed session's backend lets its locks go only once
                # it has exited, which a run started right after (a retried task) could beat.
                with suppress(psycopg2.Error):
                    store.unlock(conns[Side.TARGET], self.plan.migration)
            for conn in conns.values():
                with suppress(psycopg2.Error):
                    conn.close()

    def _engine(self, old: Side, names: ReplicationNames, tables: Sequence[TableName] | None = None) -> LogicalEngine:
        """The logical replication old -> new under `names` (no initial copy), over `tables` (the plan's)."""
        sides = Sides(old.value, old.other.value)
        plan = LogicalReplicationPlan(
            names, tuple(tables or self.plan.tables), self.plan.logical, initial_copy=False, sides=sides
        )
        return LogicalEngine(
            self._dsn[old],
            self._dsn[old.other],
            plan,
            subscription_conninfo=self._conninfo[old],
            connector=self._writable_connect,
        )

    def _stream(self, direction: Direction) -> ForwardChangeStream | None:
        """The change stream `direction` moves over, if it is not a subscription (cutover only)."""
        return self.forward_stream if direction.operation is Operation.CUTOVER else None

    def _names(self, direction: Direction) -> tuple[ReplicationNames, ReplicationNames | None]:
        """The replication the direction moves over (old -> new), and the one it starts back."""
        if direction.operation is Operation.CUTOVER:
            return self.plan.forward, self.plan.reverse
        return self.plan.reverse, None

    # -- public operations --------------------------------------------------------------------
    def cutover(self) -> OperationResult:
        with self._sessions() as conns:
            target = conns[Side.TARGET]
            rolled_back = store.load(target, self.plan.migration, Operation.ROLLBACK)
            if rolled_back is not None and rolled_back.status is not Status.ABORTED:
                raise CutoverError(
                    f"{self.plan.migration!r} was rolled back after its cutover; the target is no longer kept in step. "
                    "Tear the migration down and start it again"
                )
            progress = store.load(target, self.plan.migration, Operation.CUTOVER)
            if progress is not None and progress.status is Status.DONE:
                return self._already_done(target, progress, "cutover")
            return self._run(FORWARD, progress, conns, kind="cutover")

    def rollback(self) -> OperationResult:
        try:
            target = self._open(Side.TARGET)
        except DatabaseUnreachable as exc:
            return self._rollback_without_target(exc)
        target.close()
        # An alarm may ask for a rollback while a cutover or a retire runs: wait for it to finish, then
        # decide (after a cutover: roll back over the reverse replication; after a retire: refused, saying why).
        with self._sessions(wait_seconds=ROLLBACK_LOCK_WAIT_SECONDS) as conns:
            target = conns[Side.TARGET]
            store.note_rollback(target, self.plan.migration)  # a stopped execution's read shift will not undo it
            if not rollback_possible(store.load(target, self.plan.migration, Operation.RETIRE_REVERSE)):
                raise RollbackError(
                    f"the back replication of {self.plan.migration!r} was retired after the rollback window: the "
                    "source no longer receives the target's writes, so a rollback would lose every write made on the "
                    "target since. Nothing was changed; the target stays the database (to go back, migrate the "
                    "target to the source as a new migration)"
                )
            cut = store.load(target, self.plan.migration, Operation.CUTOVER)
            back = store.load(target, self.plan.migration, Operation.ROLLBACK)
            kind = rollback_kind(cut, back, self.router.state().writer)
            if kind is RollbackKind.NOTHING:
                assert back is not None
                return self._already_done(target, back, kind.value)
            if kind is RollbackKind.AFTER_CUTOVER:
                resume = back if back is not None and back.status is Status.RUNNING else None
                return self._run(BACKWARD, resume, conns, kind=kind.value)
            return self._rollback_before(cut, conns)

    def close_records(self) -> OperationResult:
        """An abandon's last step, after its rollback and the forward replication's teardown: the cutover,
        rollback and retire records are set aside (`store.close`), so that the migration started anew gets a
        cutover of its own; left, they would refuse it ("rolled back after its cutover") or, a cutover recorded
        done, skip it. Refused, changing nothing, while the writer may be on the target or a cutover runs."""
        with self._sessions(wait_seconds=ROLLBACK_LOCK_WAIT_SECONDS) as conns:
            target = conns[Side.TARGET]
            migration = self.plan.migration
            cut = store.load(target, migration, Operation.CUTOVER)
            back = store.load(target, migration, Operation.ROLLBACK)
            kind = rollback_kind(cut, back, self.router.state().writer)
            if not rollback_possible(store.load(target, migration, Operation.RETIRE_REVERSE)):
                why = "its back replication was retired: the target is the database"
            elif kind is RollbackKind.AFTER_CUTOVER:
                why = "the writer may be on the target: roll back first"
            elif cut is not None and cut.status is Status.RUNNING:
                why = f"cutover attempt {cut.attempt} is running: roll back first"
            else:
                if back is not None and back.status is Status.DONE:
                    store.keep_target_fence(target, migration)
                closed = store.close(target, migration)
                return OperationResult(
                    migration,
                    "abandon",
                    kind.value,
                    "done" if closed else "already_done",
                    notes=[f"set aside: {record}" for record in closed] or ["no record of a cutover to set aside"],
                )
            raise CutoverError(f"the records of {migration!r} cannot be set aside: {why}. Nothing was changed")

    def retire_reverse(self) -> OperationResult:
        """End the back replication once the rollback window has passed (see the module's docstring)."""
        operation = Operation.RETIRE_REVERSE
        with self._sessions() as conns:
            target = conns[Side.TARGET]
            progress = store.load(target, self.plan.migration, operation)
            if progress is not None and progress.status is Status.DONE:
                return self._already_done(target, progress, operation.value)
            blocker = retire_blocker(
                store.load(target, self.plan.migration, Operation.CUTOVER),
                store.load(target, self.plan.migration, Operation.ROLLBACK),
            )
            if blocker is not None:
                raise CutoverError(
                    f"the back replication of {self.plan.migration!r} cannot be retired: {blocker}. Nothing was changed"
                )
            if progress is None:
                progress = store.begin(target, self.plan.migration, operation)
            runs: list[StepRun] = []
            for step in RETIRE_STEPS:
                if progress.completed(step):
                    continue
                started = self._clock()
                detail = self._retire_step(step, conns)
                progress = self._record(target, progress, step, self._clock() - started, detail, runs)
            return OperationResult(
                self.plan.migration,
                operation.value,
                operation.value,
                "done",
                progress.attempt,
                steps=runs,
                notes=["the source stays fenced (read-only): a copy of the target as of the retire"],
            )

    def rollback_readiness(self, *, add_new_tables: bool = False) -> RollbackReadiness:
        """Whether a rollback would run now, read through the rollback window: DDL run on the target alone,
        a table created there, a stopped subscription or a lost slot breaks the back replication, and a
        rollback would then be refused (`_check_ready`) or lose rows when an alarm asks for it. The target's
        tables are selected anew (`plan.patterns`). With `add_new_tables`, a table created on the target
        after the cutover that the source has since been given alike and empty is added to the back
        replication first (`LogicalEngine.add_tables`: its table sync copies it); else read-only. Takes no
        lock. A database that cannot be reached is a problem to report, not an error: the window's gate
        must not roll back for it."""
        try:
            target = self._open(Side.TARGET)
            try:
                records = {op: store.load(target, self.plan.migration, op) for op in Operation}
                tables = self._selected_on(target)
            finally:
                target.close()
            if retire_blocker(records[Operation.CUTOVER], records[Operation.ROLLBACK]) is not None or not (
                rollback_possible(records[Operation.RETIRE_REVERSE])
            ):
                return RollbackReadiness(applies=False)
            engine = self._engine(Side.TARGET, self.plan.reverse, tables)
            status = engine.status()
            refused: list[str] = []
            if add_new_tables and status.tables_to_add:
                try:
                    engine.add_tables()
                except (ReplicationSetupError, TableLocksBusy) as exc:  # reported: the gate must not fail on it
                    refused.append(f"adding {', '.join(status.tables_to_add)} to it: {_first_line(exc)}")
                status = engine.status()
        except DatabaseUnreachable as exc:
            return RollbackReadiness.unreachable(exc)
        what = f"replication target -> source ({self.plan.reverse.subscription})"
        problems = [*status.problems, *refused]
        if status.phase is not Phase.STREAMING:
            problems.insert(0, f"{what} is {status.phase.value}, not streaming")
        lagging = lag_problem(what, status, self.plan.max_lag_bytes)
        if lagging is not None:
            problems.append(f"{lagging}: a rollback would hold writes while the source catches up")
        retained = status.slot.retained_wal_bytes if status.slot is not None else None
        return RollbackReadiness(True, problems, status.lag_bytes, retained)

    def _selected_on(self, conn: Connection) -> list[TableName]:
        """The migration's tables as `conn`'s database holds them now (the plan's when it has no patterns)."""
        if self.plan.patterns is None:
            return list(self.plan.tables)
        include, exclude = self.plan.patterns
        return select_tables(list_tables(conn), include, exclude) or list(self.plan.tables)

    def status(self) -> dict[str, Any]:
        with self._sessions(lock=False) as conns:
            target = conns[Side.TARGET]
            result: dict[str, Any] = {"migration": self.plan.migration}
            for op in Operation:
                progress = store.load(target, self.plan.migration, op)
                result[op.value] = (
                    None
                    if progress is None
                    else {**asdict(progress), "pause_seconds": store.pause_seconds(target, self.plan.migration, op)}
                )
            state = self.router.state()
            result["router"] = asdict(state)
            result["source_fenced"] = is_fenced(conns[Side.SOURCE])
            result["target_fenced"] = is_fenced(target)
            result["history"] = store.history(target, self.plan.migration)
            return result

    def _already_done(self, target: Connection, progress: Progress, kind: str) -> OperationResult:
        return OperationResult(
            self.plan.migration,
            progress.operation.value,
            kind,
            "already_done",
            progress.attempt,
            progress.fence_lsn,
            store.pause_seconds(target, self.plan.migration, progress.operation),
        )

    # -- the protocol ----------------------------------------------------------------------------
    def _run(
        self, direction: Direction, progress: Progress | None, conns: dict[Side, Connection], *, kind: str
    ) -> OperationResult:
        names, back = self._names(direction)
        target = conns[Side.TARGET]
        if progress is None or progress.status is not Status.RUNNING:
            self._check_ready(direction, names)
            if back is not None:  # before the fence: its table locks never wait inside the pause
                self._engine(direction.new, back).publish()
            progress = store.begin(target, self.plan.migration, direction.operation)
        else:
            self._reassert_fence(direction, progress, conns, names, back)
        runs: list[StepRun] = []
        for step in remaining_steps(direction, progress):
            started = self._clock()
            try:
                detail, extra = self._do(step, direction, progress, conns, names, back)
            except Exception as exc:
                if direction.steps.index(step) < direction.steps.index(POINT_OF_NO_RETURN):
                    if connection_lost(exc):
                        self._interrupted(direction, progress, conns, step, exc)
                    self._abort(direction, progress, conns, names, back, step, exc)
                raise
            progress = self._record(target, progress, step, self._clock() - started, detail, runs, **extra)
        return OperationResult(
            self.plan.migration,
            direction.operation.value,
            kind,
            "done",
            progress.attempt,
            progress.fence_lsn,
            store.pause_seconds(target, self.plan.migration, direction.operation),
            runs,
        )

    def _record(
        self,
        target: Connection,
        progress: Progress,
        step: Step,
        seconds: float,
        detail: dict[str, Any],
        runs: list[StepRun],
        **extra: Any,
    ) -> Progress:
        """Record `step` as done (the operation is done with its last step), between the hooks."""
        operation = progress.operation
        if self.hooks.before_record:
            self.hooks.before_record(operation, step)
        progress = store.record(
            target, self.plan.migration, progress, step, seconds, detail, done=step is STEPS[operation][-1], **extra
        )
        runs.append(StepRun(step.value, round(seconds, 6), detail))
        if self.hooks.after_record:
            self.hooks.after_record(operation, step)
        return progress

    def _check_ready(self, direction: Direction, names: ReplicationNames) -> None:
        stream = self._stream(direction)
        engine: ForwardChangeStream | LogicalEngine = (
            stream if stream is not None else self._engine(direction.old, names)
        )
        what = f"replication {direction.old.value} -> {direction.new.value} ({'change stream' if stream else names.subscription})"
        # PostgreSQL's launcher starts apply workers at most once per wal_retrieve_retry_interval
        # (5 s) per server: a subscription created or enabled moments ago may not run yet.
        # Nor may a cutover fence while nothing reads the slot (a Debezium connector waits `restart_wait_ms` before it
        # restarts after a lost connection): its catch-up would wait for the reader inside the write pause.
        timeout = self.plan.settings.catch_up_timeout_seconds
        deadline = self._clock() + timeout
        while True:
            status = engine.status()
            if status.phase is not Phase.STREAMING:
                raise CutoverNotReady(f"{what} is {status.phase.value}, not streaming: nothing was changed")
            slot = status.slot
            unread = (
                slot if direction.operation is Operation.CUTOVER and slot and slot.exists and not slot.active else None
            )
            if not status.problems and unread is None:
                break
            if self._clock() > deadline:
                if status.problems:
                    raise CutoverNotReady(f"{what} has problems: {'; '.join(status.problems)}; nothing was changed")
                raise CutoverNotReady(
                    f"{what}: its slot {unread.name if unread else ''} had no reader connected through a wait of "
                    f"{timeout:g} s (restarting, or down); nothing was changed"
                )
            time.sleep(0.1)
        lagging = lag_problem(what, status, self.plan.max_lag_bytes)
        if lagging is not None:
            raise CutoverNotReady(
                f"{lagging}: the fence would last while it catches up. Nothing was changed; try again when the lag "
                "is lower"
            )
        if direction.operation is Operation.CUTOVER and self.router.state().writer is direction.new:
            raise CutoverNotReady(
                f"the router's writer already points at the {direction.new.value} although no cutover is recorded: "
                "check the router by hand"
            )

    def _reassert_fence(
        self,
        direction: Direction,
        progress: Progress,
        conns: dict[Side, Connection],
        names: ReplicationNames,
        back: ReplicationNames | None,
    ) -> None:
        """Resuming after an interruption: the fence must still stand where the record says it does."""
        if not progress.completed(Step.FENCE) or progress.past_point_of_no_return:
            return
        try:
            if not is_fenced(conns[direction.old]):
                raise CutoverError(
                    f"the {direction.old.value} database's fence was lifted while the {direction.operation.value} was "
                    "interrupted: writes may have happened after the recorded position"
                )
            hold = self.router.begin_hold()
            deadline = self._clock() + self.plan.settings.fence_timeout_seconds
            while not hold.done():
                if self._clock() > deadline:
                    raise CutoverError(f"the router could not hold its clients again: waiting for {hold.describe()}")
                time.sleep(0.002)
        except Exception as exc:
            self._abort(direction, progress, conns, names, back, Step.FENCE, exc)

    def _do(
        self,
        step: Step,
        direction: Direction,
        progress: Progress,
        conns: dict[Side, Connection],
        names: ReplicationNames,
        back: ReplicationNames | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        old, new = conns[direction.old], conns[direction.new]
        settings = self.plan.settings
        stream = self._stream(direction)
        if step is Step.FENCE:
            # The stream's own sessions outlive the fence until its catch-up (see there).
            left = stream.own_source_sessions(old) if stream is not None else []
            fence = take_fence(
                old,
                self.router,
                grace=settings.fence_grace_seconds,
                timeout=settings.fence_timeout_seconds,
                terminate_long=settings.terminate_long_transactions,
                exempt_pids=[b.pid for b in left],
                exempt_subscriptions=[n.subscription for n in (names, back, self.plan.forward) if n is not None],
            )
            lsn = fence_position(old)
            detail = {
                "database": fence.database,
                "router_held_clients": fence.router_held_clients,
                "ended_sessions": [asdict(s) for s in fence.ended],
                "stream_sessions": [asdict(b) for b in left],
                "lsn": str(lsn),
            }
            return detail, {"fence_lsn": str(lsn), "held_seconds": fence.seconds}
        if step is Step.CATCH_UP and stream is not None:
            # A connector whose session the fence ended fails at its next probe or heartbeat and restarts
            # (`restart_wait_ms` later) before it publishes the marker. So its sessions are ended only now, and
            # gone before the marker is written: whatever they committed precedes the marker.
            fenced = store.step_detail(conns[Side.TARGET], self.plan.migration, progress, Step.FENCE) or {}
            ended = end_backends(
                old,
                [Backend(**b) for b in fenced.get("stream_sessions", [])],
                timeout=settings.fence_timeout_seconds,
            )
            reached = stream.wait_for_fence(old, settings.catch_up_timeout_seconds)
            return {
                "signal": "fence marker",
                "stream_sessions_ended": ended,
                "waited_seconds": reached.waited_seconds,
                "marker_seen_seconds": reached.marker_seen_seconds,
                "reached": reached.marker_lsn,
            }, {}
        if step is Step.CATCH_UP:
            assert progress.fence_lsn is not None
            caught = wait_for_lsn(
                new,
                names.subscription,
                Lsn.parse(progress.fence_lsn),
                timeout=settings.catch_up_timeout_seconds,
                source=old,
                slot=names.slot,
                max_poll_interval=0.005,
            )
            return {
                "signal": caught.signal,
                "waited_seconds": caught.waited_seconds,
                "reached": str(caught.reached_lsn),
            }, {}
        if step is Step.SYNC_SEQUENCES:
            synced = sync_sequences(old, new, self.plan.tables, margin=settings.sequence_margin)
            return {"sequences": len(synced), "moved": sum(s.changed for s in synced)}, {}
        if step is Step.STOP_REPLICATION and stream is not None:
            # Nothing is applied after this (checked on the target by every batch); the processes are
            # left running, so the pause costs milliseconds and an undo resumes at once.
            stream.pause_applying()
            return {"change_stream": "applier paused"}, {}
        if step is Step.STOP_REPLICATION:
            ended = stop_subscription(new, names.subscription)
            return {"apply_workers_ended": ended}, {}
        if step is Step.START_BACK_REPLICATION:
            assert back is not None
            started = self._engine(direction.new, back).start()
            return {"subscription": back.subscription, "already_running": started.already_running}, {}
        if step is Step.UNFENCE_NEW:
            return {"lifted": lift_fence(new)}, {}
        if step is Step.SWITCH_WRITER:
            self.router.switch_writer(direction.new)
            return {"writer": direction.new.value}, {}
        if step is Step.RELEASE:
            self.router.release()
            return {}, {"released": True}
        if step is Step.MOVE_READS:
            self.router.set_read_weight(100 if direction.new is Side.TARGET else 0)
            return {"reads": direction.new.value}, {}
        if step is Step.RETIRE_REPLICATION:
            removed = (
                stream.teardown() if stream is not None else self._engine(direction.old, names).teardown()
            ).removed
            if direction.operation is Operation.ROLLBACK:
                # The cutover's forward replication, if it never got to retiring it itself.
                removed += self._teardown_forward()
            return {"removed": removed}, {}
        raise AssertionError(f"unknown step {step}")  # pragma: no cover

    def _interrupted(
        self, direction: Direction, progress: Progress, conns: dict[Side, Connection], step: Step, exc: BaseException
    ) -> None:
        """A server went away inside the fence (crashed, restarting): undoing needs it too, and the fence keeps
        every write out meanwhile, so nothing is undone. The task's retry (DatabaseUnreachable) resumes at `step`
        once it is back, as after a process that died; when the retries run out, the rollback undoes it."""
        lost = " and ".join(side.value for side, conn in conns.items() if conn.closed) or "database"
        raise DatabaseUnreachable(
            f"{direction.operation.value} of {self.plan.migration!r} (attempt {progress.attempt}) lost its "
            f"connection to the {lost} at {step.value}: {_first_line(exc)}. Nothing was undone: the "
            f"{direction.old.value} database "
            "stays fenced and the router holds its clients; run it again to resume, or the rollback to undo it"
        ) from exc

    def _abort(
        self,
        direction: Direction,
        progress: Progress,
        conns: dict[Side, Connection],
        names: ReplicationNames,
        back: ReplicationNames | None,
        step: Step,
        exc: BaseException,
    ) -> None:
        """Undo an attempt that failed before its point of no return, then raise CutoverAborted."""
        problems = self._undo(direction, conns, names, back)
        with suppress(psycopg2.Error):
            store.mark(conns[Side.TARGET], self.plan.migration, progress, Status.ABORTED, _first_line(exc))
        message = (
            f"{direction.operation.value} of {self.plan.migration!r} (attempt {progress.attempt}) failed at "
            f"{step.value}: {_first_line(exc)}. "
        )
        if problems:
            message += f"Undoing it failed too ({'; '.join(problems)}): run the rollback."
        else:
            message += (
                f"It was undone: the {direction.old.value} database is writable, clients continue there and "
                f"replication {direction.old.value} -> {direction.new.value} runs again."
            )
        raise CutoverAborted(message) from exc

    def _undo(
        self,
        direction: Direction,
        conns: dict[Side, Connection],
        names: ReplicationNames,
        back: ReplicationNames | None,
    ) -> list[str]:
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:
                problems.append(f"{what}: {_first_line(exc)}")

        if back is not None:
            attempt("dropping the back replication", lambda: self._engine(direction.new, back).teardown())
        stream = self._stream(direction)
        if stream is not None:
            attempt("starting the change stream again", stream.start)
        else:
            attempt("enabling replication again", lambda: enable_subscription(conns[direction.new], names.subscription))
        attempt("lifting the fence", lambda: lift_fence(conns[direction.old]))
        attempt("releasing the router's clients", self.router.release)
        return problems

    # -- retiring the back replication -------------------------------------------------------
    def _retire_step(self, step: Step, conns: dict[Side, Connection]) -> dict[str, Any]:
        names = self.plan.reverse
        target, source = conns[Side.TARGET], conns[Side.SOURCE]
        if step is Step.CATCH_UP:
            sub = _subscription(source, names.subscription)
            if sub is None or not sub[1]:
                raise CutoverError(
                    f"the back replication's subscription {names.subscription} on the source is "
                    f"{'missing' if sub is None else 'disabled'}, so the source cannot catch up with the target. "
                    "Nothing was dropped: enable it and retry, or drop the back replication by hand"
                )
            position = current_lsn(target)
            # A flushed commit past the position: the walsender decodes past it at once, even when
            # the target takes no writes, so the wait ends without waiting for the next write.
            execute(target, "SELECT pg_logical_emit_message(true, 'zdm', 'retire_reverse')")
            timeout = self.plan.settings.catch_up_timeout_seconds
            try:
                caught = wait_for_lsn(
                    source, names.subscription, position, timeout=timeout, source=target, slot=names.slot
                )
            except LsnWaitTimeout as exc:
                raise ReverseReplicationBehind(
                    f"the source did not apply the target's writes up to {position} within {timeout:g}s "
                    f"(cutover.catch_up_timeout_seconds) over {names.subscription}: {exc}. Nothing was dropped and a "
                    "rollback is still possible; retry the retire"
                ) from exc
            return {
                "position": str(position),
                "signal": caught.signal,
                "waited_seconds": caught.waited_seconds,
                "reached": str(caught.reached_lsn),
            }
        if step is Step.RETIRE_REPLICATION:
            return {"removed": self._engine(Side.TARGET, names).teardown().removed}
        raise AssertionError(f"not a retire step: {step}")  # pragma: no cover

    # -- rollback before cutover -------------------------------------------------------------
    def _rollback_before(self, cut: Progress | None, conns: dict[Side, Connection]) -> OperationResult:
        notes: list[str] = []
        runs: list[StepRun] = []

        def timed(name: str, action: Callable[[], Any]) -> None:
            started = self._clock()
            outcome = action()
            runs.append(StepRun(name, round(self._clock() - started, 6), outcome if isinstance(outcome, dict) else {}))

        if cut is not None and cut.status is Status.RUNNING:
            names, back = self._names(FORWARD)
            problems = self._undo(FORWARD, conns, names, back)
            if problems:
                raise RollbackError(f"undoing the running cutover attempt failed: {'; '.join(problems)}")
            store.mark(conns[Side.TARGET], self.plan.migration, cut, Status.ABORTED, "rolled back before cutover")
            notes.append(f"cutover attempt {cut.attempt} was running; it was undone")
        timed("lift_source_fence", lambda: {"lifted": lift_fence(conns[Side.SOURCE])})
        timed("writer_on_source", lambda: self._writer_on_source())
        timed("release", self.router.release)
        timed("reads_on_source", lambda: self.router.set_read_weight(0))
        # Clients holding a cached answer still open sessions on the target for the records' TTL: it
        # stays read-only until then, so a write through the reader path cannot land there and be lost.
        timed("reader_ttl", lambda: time.sleep(self.router.stale_seconds))
        # The read shift fenced the target (a replica takes no writes); with no traffic left on it,
        # it goes back to how the migration found it, so the migration can be started again. Not a fence
        # a rollback after an earlier cutover left (an abandon run twice): that one a person lifts.
        target = conns[Side.TARGET]
        if store.target_fence_kept(target, self.plan.migration):
            timed("lift_target_fence", lambda: {"lifted": False, "kept": "a rollback after the cutover left it"})
        else:
            timed("lift_target_fence", lambda: {"lifted": lift_fence(target)})
        timed("stop_forward_replication", self._stop_forward)
        notes.append(
            "forward replication is stopped (its slot keeps WAL on the source until it is started again or torn down)"
        )
        return OperationResult(
            self.plan.migration,
            Operation.ROLLBACK.value,
            RollbackKind.BEFORE_CUTOVER.value,
            "done",
            steps=runs,
            notes=notes,
        )

    def _stop_forward(self) -> None:
        if self.forward_stream is not None:
            self.forward_stream.stop()
        else:
            self._engine(Side.SOURCE, self.plan.forward).stop()

    def _teardown_forward(self) -> list[str]:
        if self.forward_stream is not None:
            return self.forward_stream.teardown().removed
        return self._engine(Side.SOURCE, self.plan.forward).teardown().removed

    def _writer_on_source(self) -> dict[str, Any]:
        if self.router.state().writer is not Side.SOURCE:
            self.router.switch_writer(Side.SOURCE)
            return {"switched": True}
        return {"switched": False}

    def _rollback_without_target(self, reason: DatabaseUnreachable) -> OperationResult:
        writer = self.router.state().writer
        if writer is Side.TARGET:
            # Retried by the task (DatabaseUnreachable): the target that tripped the alarm by crashing is often back
            # within a minute, and only with it can the rollback bring its writes over
            raise DatabaseUnreachable(
                f"the writer points at the target, which cannot be reached ({reason}). Rolling back now would lose "
                "the writes made on the target that the back replication has not applied to the source yet, so "
                "nothing was changed: the rollback waits for the target (its task's retries), and if it stays "
                "unreachable, restore access to it and run the rollback again"
            ) from reason
        source = self._open(Side.SOURCE)
        try:
            lifted = lift_fence(source)
            dropped = drop_subscription_locally(source, self.plan.reverse.subscription)
        finally:
            source.close()
        self._writer_on_source()
        self.router.release()
        self.router.set_read_weight(0)
        notes = [
            # Either it never left, or a rollback after the cutover had moved it back (past its catch-up) when the
            # target went: the target's records, which would tell, are out of reach
            f"the target could not be reached ({reason}); the writer points at the source",
            "forward replication was not stopped: its subscription lives on the target",
        ]
        if dropped:
            notes.append("the back replication's subscription on the source was dropped (its slot stays on the target)")
        return OperationResult(
            self.plan.migration,
            Operation.ROLLBACK.value,
            RollbackKind.BEFORE_CUTOVER.value,
            "done",
            steps=[StepRun("lift_source_fence", 0.0, {"lifted": lifted})],
            notes=notes,
        )


# -- subscriptions, on the subscriber -----------------------------------------------------------


def stop_subscription(conn: Connection, name: str, timeout: float = 10.0) -> int:
    """Disable `name` and end its apply worker now; returns how many workers were ended.

    DISABLE alone lets the worker notice at its next wake-up (up to about a second); ending
    it makes the stop immediate. The launcher does not restart a disabled subscription.
    """
    sub = _subscription(conn, name)
    if sub is None:
        return 0
    if sub[1]:
        execute(conn, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(name)))
    ended: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        rows = fetch_all(conn, "SELECT pid FROM pg_stat_subscription WHERE subid = %s AND pid IS NOT NULL", (sub[0],))
        if not rows:
            return len(ended)
        for (pid,) in rows:
            if pid not in ended:
                execute(conn, "SELECT pg_terminate_backend(%s)", (pid,))
                ended.add(pid)
        if time.monotonic() > deadline:
            raise CutoverError(f"the apply worker(s) of subscription {name} did not exit within {timeout:g}s")
        time.sleep(0.001)


def enable_subscription(conn: Connection, name: str) -> bool:
    sub = _subscription(conn, name)
    if sub is None or sub[1]:
        return False
    execute(conn, sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))
    return True


def drop_subscription_locally(conn: Connection, name: str) -> bool:
    """Drop `name` without contacting its publisher (the slot there is left for later)."""
    if _subscription(conn, name) is None:
        return False
    ident = sql.Identifier(name)
    execute(conn, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    execute(conn, sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
    execute(conn, sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    return True
