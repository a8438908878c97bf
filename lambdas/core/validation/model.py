"""What crosses task boundaries: the plan, one chunk to compare, a chunk's result, the summary.

Every model is plain JSON (`model_dump(mode="json")` / `model_validate`), so Step Functions can
hand the plan's chunks to a Map state, one task per chunk, and the results to the summary task.
A chunk carries everything its task needs (the table's key, columns and hash function), so a
task never re-reads the plan. Keys travel as the text form of each key column (as in
`ranges.KeyRange`); SQL casts them back to the key's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lambdas.core.ranges import Bound, KeyRange
from lambdas.core.tables import TableName

Key = tuple[str, ...]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowHash(StrEnum):
    """How a row's text form becomes a 64-bit number inside the database."""

    FAST = "hashtextextended"  # PostgreSQL's own text hash: about four times faster than md5
    MD5 = "md5"  # md5 of the UTF-8 bytes: the same on every server, encoding and version


class ValueHash(StrEnum):
    """How one column enters the fast row hash.

    TEXT hashes the column's text form. The others hash the value with PostgreSQL's own hash for
    its type, for types whose text form (under the pinned settings) and value determine each other,
    when both sides hold the same kind: the same rows hash the same as by text form, at about a
    third of the cost for these types (no output function).
    """

    TEXT = "text"
    INTEGER = "integer"  # smallint, integer, bigint (any mix: one 64-bit hash of the value)
    TIMESTAMP = "timestamp"  # timestamp without time zone
    TIMESTAMPTZ = "timestamptz"  # the instant, as a timestamp in UTC (the pinned TimeZone)
    UUID = "uuid"


class ColumnSpec(_Model):
    name: str
    type: str  # format_type() on the source
    hash: ValueHash = ValueHash.TEXT


def table_label(schema: str, name: str) -> str:
    def part(text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if "." in text or '"' in text else text

    return f"{part(schema)}.{part(name)}"


class TableSpec(_Model):
    """One table as both sides have it: the key, the compared columns, and any schema difference."""

    schema_name: str
    name: str
    key: list[str] = Field(default_factory=list)  # empty: no primary key, compared as a multiset
    key_types: list[str] = Field(default_factory=list)
    columns: list[ColumnSpec] = Field(default_factory=list)  # present on both sides, in the source's order
    row_hash: RowHash = RowHash.MD5
    # Read with ONLY: a plain table's inheritance children hold rows of their own (the copy reads ONLY it too).
    # Not for a partitioned table on either side, whose rows are all in its partitions.
    only: bool = False
    estimated_rows: int = 0
    comparable: bool = True  # False: missing on one side or keys differ; nothing is compared
    problems: list[str] = Field(default_factory=list)  # schema differences, each a reason to fail
    notes: list[str] = Field(default_factory=list)  # how it is compared, where that is not the usual way

    @property
    def table(self) -> TableName:
        return TableName(self.schema_name, self.name)

    @property
    def label(self) -> str:
        """The table's name as results, counts and stored objects are keyed by: `schema.name`, with a
        part quoted when it holds a dot or a double quote (else "public.a".b and public."a.b" collide)."""
        return table_label(self.schema_name, self.name)

    @property
    def multiset(self) -> bool:
        return not self.key

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


class Replication(_Model):
    """Changes still flow source -> target: differences are re-checked once the target caught up."""

    subscription: str  # the subscription to wait on; for a change stream, its name (the handler waits on it)
    slot: str | None = None  # lets the wait accept the walsender's report (positions after the last commit)
    timeout_seconds: float = 60.0
    attempts: int = 5


class RangeSpec(_Model):
    """A `KeyRange` as JSON: rows with lower <= key < upper; null is unbounded."""

    lower: list[str] | None = None
    upper: list[str] | None = None

    @classmethod
    def of(cls, key_range: KeyRange) -> RangeSpec:
        return cls(
            lower=list(key_range.lower) if key_range.lower is not None else None,
            upper=list(key_range.upper) if key_range.upper is not None else None,
        )

    def key_range(self) -> KeyRange:
        return KeyRange(
            tuple(self.lower) if self.lower is not None else None,
            tuple(self.upper) if self.upper is not None else None,
        )


class ChunkSpec(_Model):
    """One Map item: a key range of one table, planned as slices of about `slice_rows` rows (the
    chunk is compared in smaller ranges sized at run time, see `bisect.AdaptivePolicy`)."""

    table: TableSpec
    number: int  # 0-based, in key order
    chunks: int  # how many the table has
    range: RangeSpec = Field(default_factory=RangeSpec)
    slices: list[list[str]] = Field(default_factory=list)  # inner boundaries splitting `range`
    slice_rows: int = 10_000
    first_keys: int = 20
    replication: Replication | None = None
    # A whole table compared by one scan per side, its rows counted and hashed per bucket of the key (a
    # key range each for a uuid or integer key, else a hash's top bits: `bisect.KeyBuckets`), then the
    # differing buckets' rows: for a key in no physical order, whose key ranges would each read pages all
    # over the table.
    bucket_bits: int | None = Field(default=None, ge=1, le=16)
    scan_workers: int = Field(default=1, ge=1)  # processes per side for that scan (parallel query)
    # A table too large for one task's scan: its buckets split into `bucket_groups` groups (a power of 2),
    # each one chunk comparing the rows whose buckets' top bits are `bucket_group` (each chunk scans the
    # whole table and hashes only its group's rows).
    bucket_groups: int = Field(default=1, ge=1)
    bucket_group: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _group_in_groups(self) -> ChunkSpec:
        groups = self.bucket_groups
        if groups & (groups - 1) or self.bucket_group >= groups or (groups > 1 and self.bucket_bits is None):
            raise ValueError(
                f"bucket_group {self.bucket_group} of {groups} bucket_groups: expected a power of 2 groups"
                " of a table compared in key buckets, the group below their number"
            )
        return self

    def slice_ranges(self) -> list[KeyRange]:
        """The slices in key order; together exactly `range`."""
        whole = self.range.key_range()
        points: list[Bound | None] = [whole.lower, *(tuple(b) for b in self.slices), whole.upper]
        return [KeyRange(points[i], points[i + 1]) for i in range(len(points) - 1)]


@dataclass(frozen=True)
class ChunkStep:
    """What a running chunk is doing, for a person watching (not a task boundary: never stored).

    A chunk reports each step as it starts and as it goes: `done` of `total` `unit`s (total None
    when not known before the step ends, as for a scan counting rows per key bucket)."""

    table: str
    chunk: int  # 0-based
    chunks: int
    step: str  # "key ranges", "key buckets", "rows of differing buckets", "differing rows"
    done: int
    total: int | None
    unit: str  # "slices", "rows", "keys"

    def describe(self) -> str:
        """The step and how far it is, e.g. `rows of differing buckets, 900/1,000 rows`."""
        if self.total is not None:
            return f"{self.step}, {self.done:,}/{self.total:,} {self.unit}"
        return f"{self.step}, {self.done:,} {self.unit}" if self.done else self.step  # a scan that tells nothing


OnStep = Callable[[ChunkStep], None]


class StoredItems(_Model):
    """Where a stored plan's chunks and results are (lambdas/core/validation/store.py)."""

    bucket: str
    key: str  # the chunk list: one JSON array, the Distributed Map's ItemReader input
    results_prefix: str  # one object per chunk result
    chunks: int
    # the whole plan (tables, chunks per table): a state carries at most 256 KiB, and a
    # hundred-odd tables' specs exceed it (States.DataLimitExceeded, which no Catch catches)
    plan: str | None = None


class ValidationPlan(_Model):
    started_at: float  # epoch seconds: the summary's duration runs from here
    first_keys: int = 20
    tables: list[TableSpec] = Field(default_factory=list)
    chunks: list[ChunkSpec] = Field(default_factory=list)  # empty once stored (`items` says where)
    items: StoredItems | None = None
    chunks_per_table: dict[str, int] = Field(default_factory=dict)  # kept when the chunks are stored


class KeyDiff(_Model):
    """One differing row: its key (or, in a multiset table, its text form)."""

    key: list[str]
    columns: list[str] = Field(default_factory=list)  # changed rows: the columns whose text differs
    copies: int = 1  # multiset tables: how many identical rows are missing or extra


class DiffList(_Model):
    count: int = 0
    first: list[KeyDiff] = Field(default_factory=list)  # the first `first_keys`, in key order


class ChunkResult(_Model):
    table: str
    chunk: int
    chunks: int = 1  # how many the table has: the summary notices a missing result
    multiset: bool = False
    source_rows: int = 0
    target_rows: int = 0
    slices: int = 0  # key ranges compared: by aggregate (split ranges' parts included), or pieces read line by line
    slices_mismatched: int = 0  # of those, the ranges that differed
    splits: int = 0  # ranges bisected because they held more rows than a fetch should carry
    rows_fetched: int = 0  # (key, hash) pairs downloaded, both sides
    missing: DiffList = Field(default_factory=DiffList)  # on the source, not on the target
    extra: DiffList = Field(default_factory=DiffList)  # on the target, not on the source
    changed: DiffList = Field(default_factory=DiffList)  # same key, different column values
    unsettled: DiffList = Field(default_factory=DiffList)  # kept changing at every re-check: not proven
    transient: int = 0  # differed while replication caught up, equal at the re-check
    changed_columns: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    first_lsn: str | None = None  # the source's WAL position noted at the chunk's first compare
    notes: list[str] = Field(default_factory=list)

    @property
    def differences(self) -> int:
        return self.missing.count + self.extra.count + self.changed.count


class TableSummary(_Model):
    table: str
    multiset: bool = False
    compared: bool = True
    source_rows: int = 0
    target_rows: int = 0
    chunks: int = 0  # with a result
    chunks_planned: int = 0
    chunks_mismatched: int = 0
    missing: DiffList = Field(default_factory=DiffList)
    extra: DiffList = Field(default_factory=DiffList)
    changed: DiffList = Field(default_factory=DiffList)
    unsettled: DiffList = Field(default_factory=DiffList)
    transient: int = 0
    changed_columns: dict[str, int] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    seconds: float = 0.0  # time spent in this table's chunks (summed over parallel tasks)
    rows_per_second: float = 0.0
    ok: bool = True

    @property
    def differences(self) -> int:
        return self.missing.count + self.extra.count + self.changed.count


class ValidationSummary(_Model):
    ok: bool  # no persistent difference, nothing unsettled, no schema problem, every chunk compared
    rows_compared: int = 0  # rows on the source that were compared
    target_rows: int = 0
    tables: int = 0
    chunks: int = 0
    chunks_missing: int = 0  # planned chunks without a result (a failed task)
    differences: int = 0  # persistent: missing + extra + changed
    missing: int = 0
    extra: int = 0
    changed: int = 0
    unsettled: int = 0
    transient: int = 0
    problems: int = 0
    seconds: float = 0.0  # wall clock, from the plan's start to the summary
    rows_per_second: float = 0.0
    per_table: list[TableSummary] = Field(default_factory=list)
