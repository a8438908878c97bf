"""Cutover and rollback: the writer moves between source and target without losing a write."""

from lambdas.core.cutover.runner import (
    CutoverAborted,
    CutoverError,
    CutoverNotReady,
    CutoverPlan,
    CutoverRunner,
    Hooks,
    OperationBusy,
    OperationResult,
    ReverseReplicationBehind,
    RollbackError,
    RollbackReadiness,
    StepRun,
)
from lambdas.core.cutover.steps import Operation, Status, Step

__all__ = [
    "CutoverAborted",
    "CutoverError",
    "CutoverNotReady",
    "CutoverPlan",
    "CutoverRunner",
    "Hooks",
    "Operation",
    "OperationBusy",
    "OperationResult",
    "ReverseReplicationBehind",
    "RollbackError",
    "RollbackReadiness",
    "Status",
    "Step",
    "StepRun",
]
