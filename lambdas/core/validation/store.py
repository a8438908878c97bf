"""Where a validation's chunks and their results live while a Distributed Map works through them.

A plan of a large table has more chunks than a state's 256 KB can carry, and their results more
still: the plan task stores the chunk list as one JSON array (the Map's ItemReader reads it), each
chunk task stores its own result under a per-plan prefix, and the summary task reads them all back.
One abstract base, one file per backend (`store_s3.S3ValidationStore`); the domain core never
touches AWS itself.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from urllib.parse import quote

from lambdas.core.validation.model import ChunkResult, ChunkSpec, StoredItems, ValidationPlan

RESULT_BATCH = 512  # results read (in parallel, by a backend that can) before they are folded
_RUN = re.compile(r"[^A-Za-z0-9_.-]")


def plan_prefix(run: str, plan_id: str | None = None) -> str:
    """`validation/<run>/<plan id>/`: a fresh plan id per plan, so a plan made again (a retried task,
    a second validation in one execution) never meets results of an earlier one."""
    return f"validation/{_RUN.sub('_', run) or 'run'}/{plan_id or uuid.uuid4().hex}/"


def result_key(items: StoredItems, table: str, chunk: int) -> str:
    # One object per chunk: a task run twice (a Step Functions retry) writes the same object again.
    return f"{items.results_prefix}{quote(table, safe='')}/{chunk:08d}.json"


class ValidationStore(ABC):
    @abstractmethod
    def put_object(self, key: str, body: bytes) -> None: ...

    @abstractmethod
    def get_object(self, key: str) -> bytes: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def location(self) -> str:
        """The bucket (or what stands for it) the Map's ItemReader and ResultWriter are given."""

    def store_chunks(self, plan: ValidationPlan, run: str) -> ValidationPlan:
        """Store the chunk list; the plan that goes on carries its location and counts, not the chunks."""
        prefix = plan_prefix(run)
        items = StoredItems(
            bucket=self.location(),
            key=f"{prefix}chunks.json",
            results_prefix=f"{prefix}results/",
            chunks=len(plan.chunks),
        )
        body = "[" + ",".join(c.model_dump_json() for c in plan.chunks) + "]"
        self.put_object(items.key, body.encode())
        per_table: dict[str, int] = {}
        for chunk in plan.chunks:
            name = chunk.table.label
            per_table[name] = per_table.get(name, 0) + 1
        # The plan without its chunks, stored too: the state may carry only where it is (see StoredItems.plan).
        items = items.model_copy(update={"plan": f"{prefix}plan.json"})
        stored = plan.model_copy(update={"chunks": [], "items": items, "chunks_per_table": per_table})
        self.put_object(f"{prefix}plan.json", stored.model_dump_json().encode())
        return stored

    def load_plan(self, items: StoredItems) -> ValidationPlan:
        """The whole plan `store_chunks` stored (the state carries only its location)."""
        if items.plan is None:
            raise ValueError("this plan was stored without its tables (items.plan is not set)")
        return ValidationPlan.model_validate_json(self.get_object(items.plan))

    def store_summary(self, items: StoredItems, body: bytes) -> str:
        key = items.results_prefix.removesuffix("results/") + "summary.json"
        self.put_object(key, body)
        return key

    def load_chunks(self, items: StoredItems) -> list[ChunkSpec]:
        from pydantic import TypeAdapter

        return TypeAdapter(list[ChunkSpec]).validate_json(self.get_object(items.key))

    def store_result(self, items: StoredItems, result: ChunkResult) -> str:
        key = result_key(items, result.table, result.chunk)
        self.put_object(key, result.model_dump_json().encode())
        return key

    def iter_results(self, items: StoredItems) -> Iterator[ChunkResult]:
        """Every stored result, read `RESULT_BATCH` objects at a time: the summary folds them as they
        come, so memory does not grow with the number of chunks."""
        keys = self.list_keys(items.results_prefix)
        for start in range(0, len(keys), RESULT_BATCH):
            for body in self.get_objects(keys[start : start + RESULT_BATCH]):
                yield ChunkResult.model_validate_json(body)

    def get_objects(self, keys: Sequence[str]) -> list[bytes]:
        return [self.get_object(k) for k in keys]
