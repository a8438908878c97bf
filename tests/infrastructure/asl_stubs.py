"""The shipped state machine definition in moto's ASL interpreter with stub handlers (no servers).

Each stub records its call (function, action or gate phase, when), so a test reads the path taken;
by default every function is healthy and succeeds; `status` is what Replication's status returns,
`failures` queues exceptions a call raises (None: that call succeeds), `unhealthy_phase` trips that gate, `reverse_problems` are
what the rollback window's checks find.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from lambdas.core.config import LagLimits, load_migration
from lambdas.core.cutover import RollbackReadiness
from lambdas.handlers.health_gate import GateRequest, check_window, window_for_state
from lambdas.handlers.replication import ReplicationRequest, poll_for_state, problems_for_state
from rehearsal.stepfunctions import ExecutionResult, LocalStateMachine
from stacks.orchestration import ASL
from tests.infrastructure.conftest import ROOT

Handler = Callable[[dict[str, Any], Any], Any]


def settings(**changes: Any) -> dict[str, Any]:
    """The local migration file's settings, with one quick read-shift step and no validation or bake."""
    data = load_migration(ROOT / "migrations/local.yaml").model_dump(mode="json")
    data["read_shift"] = {"steps": [100], "bake_seconds": 0}
    data["validation"]["enabled"] = False
    data["cutover"]["post_cutover_bake_seconds"] = 0
    data.update(changes)
    return data


class Stubs:
    """Every function the definition invokes, healthy and successful unless told otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []  # function, action or phase, when
        self.status: dict[str, Any] = {
            "phase": "streaming",
            "lag_seconds": 0.0,
            "lag_bytes": 0,
            "problems": [],
            "add_tables": False,
        }
        # Replies of successive status polls, each over `status` (the last one repeats); none: `status` alone
        self.status_replies: list[dict[str, Any]] = []
        self.unhealthy_phase: str | None = None
        self.failures: dict[tuple[str, str], list[Exception | None]] = {}  # None: that call succeeds
        # What the rollback window's checks find wrong with the back replication, one list per check (the
        # last one repeats)
        self.reverse_problems: list[list[str]] = [[]]
        # The `window` each rollback-window check was given (its `started` is None at the window's first check)
        self.windows: list[dict[str, Any]] = []

    def _note(self, function: str, what: str) -> None:
        self.calls.append((function, what, time.monotonic()))
        queued = self.failures.get((function, what))
        if queued:
            failure = queued.pop(0)
            if failure is not None:
                raise failure

    def _next_status_reply(self) -> dict[str, Any]:
        if not self.status_replies:
            return {}
        return self.status_replies.pop(0) if len(self.status_replies) > 1 else self.status_replies[0]

    def path(self) -> list[tuple[str, str]]:
        return [(function, what) for function, what, _ in self.calls]

    def at(self, function: str, what: str) -> float:
        return next(t for f, w, t in self.calls if (f, w) == (function, what))

    def handlers(self) -> dict[str, Handler]:
        def preflight(event: dict[str, Any], context: Any) -> dict[str, Any]:
            self._note("Preflight", "check")
            return {"ok": True, "failed": []}

        def replication(event: dict[str, Any], context: Any) -> dict[str, Any]:
            self._note("Replication", event["action"])
            if event["action"] == "status":
                # When to poll next, and since when problems last, as the real handler says them
                request = ReplicationRequest.model_validate(event)
                limit = LagLimits.model_validate(event["migration"].get("lag") or {}).problems_max_seconds
                reply = {**self.status, **self._next_status_reply()}
                lasting = problems_for_state(request, reply["problems"], limit)
                return {**poll_for_state(request), **lasting, "add_tables": False, **reply}
            return {
                "start": {"tables": [], "rows_copied": 0},
                "teardown": {"removed": ["subscription zdm_shop_orders"]},
                "add_tables": {"added": ["public.coupons"], "waiting": []},
            }[event["action"]]

        def refresh_views(event: dict[str, Any], context: Any) -> dict[str, Any]:
            self._note("RefreshViews", "refresh")
            return {"views": []}

        def read_shift(event: dict[str, Any], context: Any) -> dict[str, Any]:
            self._note("ReadShift", str(event["percent"]))
            return {}

        def health_gate(event: dict[str, Any], context: Any) -> dict[str, Any]:
            self._note("HealthGate", event["phase"])
            verdict: dict[str, Any] = {"healthy": True, "reasons": []}
            if event["phase"] == self.unhealthy_phase:
                verdict = {"healthy": False, "reasons": ["alarm zdm-shop-orders-health is in ALARM"]}
            request = GateRequest.model_validate(event)
            if request.window is None:
                return verdict
            self.windows.append(dict(event["window"]))
            # The window's next step as the real handler decides it, over the queued readiness problems
            problems = self.reverse_problems.pop(0) if len(self.reverse_problems) > 1 else self.reverse_problems[0]
            readiness = RollbackReadiness(applies=True, problems=problems)
            lasting = LagLimits.model_validate(event["migration"].get("lag") or {}).problems_max_seconds
            return {**verdict, **window_for_state(readiness, check_window(request.window, readiness, lasting))}

        def cutover(event: dict[str, Any], context: Any) -> dict[str, Any]:
            action = event["action"]
            self._note("Cutover", action)
            if action == "retire_reverse":
                return {"status": "done", "steps": [{"step": "catch_up", "seconds": 0.01, "detail": {}}]}
            if action == "close_records":
                return {"status": "done", "notes": ["set aside: cutover attempt 1: done"]}
            # as OperationResult.to_json() has them; the stub's rollback is one after the cutover
            kind = {"rollback": "after_cutover", "run": "cutover"}.get(action, action)
            return {"status": "done", "kind": kind, "pause_seconds": 0.05}

        return {
            "PreflightFunctionArn": preflight,
            "ReplicationFunctionArn": replication,
            "RefreshViewsFunctionArn": refresh_views,
            "ReadShiftFunctionArn": read_shift,
            "HealthGateFunctionArn": health_gate,
            "CutoverFunctionArn": cutover,
            "ValidatePlanFunctionArn": lambda e, c: {},
            "ValidateChunkFunctionArn": lambda e, c: {},
            "ValidateSummaryFunctionArn": lambda e, c: {},
        }


def execute(
    stubs: Stubs,
    execution_input: dict[str, Any] | None = None,
    *,
    window_seconds: int = 0,
    data: dict[str, Any] | None = None,
    timeout: float = 120,
) -> ExecutionResult:
    """The shipped definition, its rollback window substituted as the stack would (`window_seconds`)."""
    machine = LocalStateMachine(
        ASL,
        stubs.handlers(),
        values={
            "MigrationName": "shop-orders",
            "SettingsParameterName": "/zdm/shop-orders/settings",
            "RollbackWindowSeconds": str(window_seconds),
            "ValidationBucketName": "zdm-test-validation",
        },
        parameters={"/zdm/shop-orders/settings": json.dumps(data if data is not None else settings())},
    )
    return machine.run({"timing": {"poll_seconds": 0}, **(execution_input or {})}, timeout=timeout, poll_interval=0.05)
