"""Data validation: every row of the source proven equal on the target, or the differing rows named.

plan (`planner.plan_validation`) -> compare chunk (`chunk.compare_chunk`, one Map item each) ->
summary (`summary.summarize`); `runner.validate` runs all three in one process. Pure logic
(`plan`, `bisect`, `rowdiff`, `summary`, `model`) is kept apart from SQL (`queries`) and I/O
(`session`, `planner`, `chunk`, `runner`).
"""

from lambdas.core.validation.chunk import compare_chunk
from lambdas.core.validation.model import (
    ChunkResult,
    ChunkSpec,
    ChunkStep,
    DiffList,
    KeyDiff,
    Replication,
    RowHash,
    StoredItems,
    TableSpec,
    TableSummary,
    ValidationPlan,
    ValidationSummary,
)
from lambdas.core.validation.planner import plan_validation, replication_of
from lambdas.core.validation.runner import run_chunks, validate
from lambdas.core.validation.session import SessionPair
from lambdas.core.validation.summary import summarize

__all__ = [
    "ChunkResult",
    "ChunkSpec",
    "ChunkStep",
    "DiffList",
    "KeyDiff",
    "Replication",
    "RowHash",
    "SessionPair",
    "StoredItems",
    "TableSpec",
    "TableSummary",
    "ValidationPlan",
    "ValidationSummary",
    "compare_chunk",
    "plan_validation",
    "replication_of",
    "run_chunks",
    "summarize",
    "validate",
]
