"""Compare one chunk on both sides: range aggregates, bisection, (key, hash) fetches, row diffs, re-checks.

A chunk is compared a piece at a time (the whole chunk, or its first slice alone while nothing
is known yet about how dense differences are). While differences are rare, each piece:
1. is cut into ranges of about `AdaptivePolicy.range_rows` rows: at equal key widths for a
   single integer key (from the least and greatest key on either side), else at keys sampled on
   the source;
2. every range's aggregate (count, sum of row hashes) is computed on both sides at once, in one
   statement per side (each row read and hashed once, by index range scans in key order);
3. the ranges whose aggregates differ and hold at most 2 x slice_rows rows on either side have
   their (key, hash) lines fetched (one statement per side) and diffed; a larger one is split at
   key quantiles of the side with more rows and its parts compared the same way.
Once differences are dense (`AdaptivePolicy.every_line`: about 1 row in 1,000), small ranges'
aggregates plus re-reading the mismatching ones cost more than reading every row's (key, hash)
line once, so the piece is read that way instead (binary records for a key of integer and uuid
columns: 16 bytes a row for a bigint key).
The keys found are then read on both sides (each column as its hash) and diffed column by column. While
replication runs, each such row is re-checked (`rowdiff.settle`) after the target has applied
the source's WAL past the position noted after reading the source row, which is past the
position noted at the chunk's first compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from psycopg2 import sql

from lambdas.core.db import Connection, fetch_all
from lambdas.core.lsn import Lsn, current_lsn, wait_for_lsn
from lambdas.core.ranges import KeyRange
from lambdas.core.validation import queries
from lambdas.core.validation.bisect import (
    RECORD_LINES_COST,
    TEXT_LINES_COST,
    AdaptivePolicy,
    Aggregate,
    KeyBuckets,
    KeyHashes,
    Step,
    UuidPrefixes,
    decide,
    even_ranges,
    integer_widths,
    mismatched_buckets,
    mismatched_ranges,
    multiset_bits,
    quantile_step,
    ranges_between,
    split_range,
)
from lambdas.core.validation.model import (
    ChunkResult,
    ChunkSpec,
    ChunkStep,
    DiffList,
    Key,
    KeyDiff,
    OnStep,
    RangeSpec,
    Replication,
    RowHash,
    TableSpec,
)
from lambdas.core.validation.rowdiff import (
    INTEGER_KEY_TYPES,
    UUID_KEY_TYPE,
    HashDiff,
    Kind,
    MultisetDiff,
    RecordLayout,
    RowDifference,
    RowImage,
    diff_hash_lines,
    diff_hash_records,
    diff_line_streams,
    diff_record_streams,
    diff_row,
    multiset_diff,
    parse_row_images,
    settle,
    settle_multiset,
)
from lambdas.core.validation.session import (
    RECORD_FRAME,
    CopyStream,
    Frames,
    LineFrames,
    RecordFrames,
    SessionPair,
    run_copy_row,
    run_one,
    run_one_raw,
    run_query,
    run_with_settings,
)

T = TypeVar("T")

READ_BATCH = 10_000  # keys per full-row read
MAX_PIECE_ROWS = 500_000  # planned rows compared by one statement per side at most
# ... when every row's line is read: what one side sends and the diff holds grows with the key's width
# (1.6 MB of binary records; text keys of a few hundred bytes, tens of MB)
MAX_LINES_PIECE_ROWS = 100_000
MAX_ROW_TEXT = 200  # a multiset row is reported by its text form, cut to this length
MULTISET_FETCH_LIMIT = 500_000  # rows (per side) in differing buckets beyond which rows are not listed


def source_position(source: Connection) -> Lsn:
    """The source's WAL insert position (`lsn.current_lsn`): past every commit a snapshot taken before could see."""
    return current_lsn(source)


def wait_applied(pair: SessionPair, replication: Replication, lsn: Lsn) -> None:
    if pair.catch_up is not None:  # a change stream: everything committed up to now, so past `lsn` too
        pair.catch_up()
        return
    wait_for_lsn(
        pair.target,
        replication.subscription,
        lsn,
        timeout=replication.timeout_seconds,
        source=pair.source if replication.slot else None,
        slot=replication.slot,
    )


@dataclass
class _Tally:
    chunk: ChunkSpec
    on_step: OnStep | None = None
    source_rows: int = 0
    target_rows: int = 0
    slices: int = 0
    slices_mismatched: int = 0
    splits: int = 0
    rows_fetched: int = 0
    candidates: dict[Key, None] = field(default_factory=dict)  # ordered set
    first_lsn: Lsn | None = None
    transient: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, diff: HashDiff) -> None:
        for key in diff.keys:
            self.candidates[key] = None

    def step(self, step: str, done: int, total: int | None, unit: str) -> None:
        """Tell whoever watches what the chunk is doing (`ChunkStep`)."""
        if self.on_step is not None:
            chunk = self.chunk
            self.on_step(ChunkStep(chunk.table.label, chunk.number, chunk.chunks, step, done, total, unit))


def compare_chunk(
    pair: SessionPair,
    chunk: ChunkSpec,
    *,
    policy: AdaptivePolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_step: OnStep | None = None,
) -> ChunkResult:
    """Compare one chunk (a Map item); the result names every differing row up to `first_keys`.

    `policy` may carry what earlier chunks of the table saw (how dense differences are); `on_step`
    hears what the chunk is doing as it goes (a chunk of one table in no key order runs for minutes).
    """
    started = clock()
    tally = _Tally(chunk, on_step)
    if chunk.table.multiset:
        result = _compare_multiset(pair, chunk, tally)
    else:
        result = _compare_keyed(pair, chunk, policy or AdaptivePolicy(chunk.slice_rows), tally)
    return result.model_copy(update={"seconds": round(clock() - started, 6)})


# -- tables with a primary key ---------------------------------------------------------------


def _compare_keyed(pair: SessionPair, chunk: ChunkSpec, policy: AdaptivePolicy, tally: _Tally) -> ChunkResult:
    spec = chunk.table
    if chunk.bucket_bits is not None:
        _compare_buckets(pair, chunk, chunk.bucket_bits, tally)
    else:
        _compare_pieces(pair, chunk, policy, tally)
    if chunk.replication is not None:
        differences_found, unsettled = _recheck(pair, chunk, chunk.replication, list(tally.candidates), tally)
    else:
        differences_found, unsettled = _resolve(pair, spec, list(tally.candidates), tally)
    return _result(chunk, tally, differences_found, unsettled)


def _compare_pieces(pair: SessionPair, chunk: ChunkSpec, policy: AdaptivePolicy, tally: _Tally) -> None:
    """The chunk's key range, a piece at a time (see the module docstring)."""
    spec = chunk.table
    slices = chunk.slice_ranges()
    done = 0
    tally.step("key ranges", done, len(slices), "slices")
    while done < len(slices):
        every_line = policy.every_line(
            TEXT_LINES_COST if RecordLayout.of(spec.key_types) is None else RECORD_LINES_COST
        )
        # Until a slice's worth of rows was seen, one slice at a time: the range size adapts after it.
        most = MAX_LINES_PIECE_ROWS if every_line else MAX_PIECE_ROWS
        count = 1 if not policy.informed else max(1, most // max(1, chunk.slice_rows))
        piece = slices[done : done + count]
        done += len(piece)
        key_range = KeyRange(piece[0].lower, piece[-1].upper)
        if every_line:
            rows, differences = _compare_every_line(pair, chunk, key_range, tally)
        else:
            ranges = _cut(pair, spec, key_range, len(piece) * chunk.slice_rows, policy.range_rows)
            rows, differences = _compare_ranges(pair, chunk, ranges, tally, depth=0)
        policy.record(rows, differences)
        tally.step("key ranges", done, len(slices), "slices")


def _compare_buckets(pair: SessionPair, chunk: ChunkSpec, bits: int, tally: _Tally) -> None:
    """The whole table by one scan per side, counted and hashed per bucket of the key (`_key_buckets`;
    parallel query: `chunk.scan_workers` processes a side), then the rows of the differing buckets by
    one more scan, sorted by key and streamed: binary records for a key of integer and uuid columns,
    else `key<TAB>hash` lines. In a table split in groups of buckets, only the rows of the chunk's group
    are hashed (`queries.bucket_group`). When a sample of rows shows differences dense enough that
    nearly every bucket would differ (`_dense_in_sample`), the bucket scan is skipped: every row of the
    group is streamed at once."""
    spec = chunk.table
    key_buckets = _key_buckets(pair, spec, bits, grouped=chunk.bucket_groups > 1)
    if key_buckets is None:
        return
    group = queries.bucket_group(spec, key_buckets, chunk.bucket_group, chunk.bucket_groups)
    settings = {
        "max_parallel_workers_per_gather": str(chunk.scan_workers - 1),
        # A hash table of the buckets: the planner cannot know their number and would sort the whole table.
        "enable_sort": "off",
        "work_mem": "64MB",
        # The follow-up scans' key span (`queries._in_buckets`) is a filter: its rows lie all over the table.
        "enable_indexscan": "off",
        "enable_bitmapscan": "off",
    }
    stream_settings = {**settings, "enable_sort": "on"}
    if _dense_in_sample(pair, chunk, group, tally):
        counts = _stream_buckets(pair, spec, key_buckets, None, group, stream_settings, ("every row", None), tally)
        _note_first(pair, chunk, tally)
        tally.source_rows += counts[0]
        tally.target_rows += counts[1]
        tally.slices += 1  # one piece read row by row
        tally.slices_mismatched += 1 if tally.candidates else 0
        return
    query, params = queries.key_buckets(spec, key_buckets, group)
    tally.step("key buckets", 0, None, "rows")
    src_rows, tgt_rows = pair.both(run_with_settings(settings, run_query(query, params)))
    _note_first(pair, chunk, tally)
    source = {int(b): Aggregate(int(n), str(s)) for b, n, s in src_rows}
    target = {int(b): Aggregate(int(n), str(s)) for b, n, s in tgt_rows}
    tally.source_rows += sum(a.rows for a in source.values())
    tally.target_rows += sum(a.rows for a in target.values())
    tally.slices += key_buckets.count // chunk.bucket_groups
    buckets = mismatched_buckets(source, target)
    tally.slices_mismatched += len(buckets)
    if not buckets:
        return
    # One more scan: the rows of every differing bucket; when every bucket either side holds differs
    # (dense differences), every row, no bucket computed.
    chosen = None if set(buckets) == set(source) | set(target) else buckets
    in_chosen = sum(a.rows for b, a in source.items() if chosen is None or b in chosen)
    progress = ("rows of differing buckets", in_chosen)
    _stream_buckets(pair, spec, key_buckets, chosen, group, stream_settings, progress, tally)


# A chunk in key buckets first reads this many of its source rows' keys, at random pages, on both sides:
# when at least `DENSE_SAMPLE_DIFFERENCES` differ (1 row in 2,000), nearly every one of the 1,024 buckets
# would differ (all of them, past about 1 row in 10,000), so the bucket scan is skipped. A sample read
# only where the chunk holds ten times as many rows: on a small table, the bucket scan costs little.
SAMPLE_KEYS = 4_000
DENSE_SAMPLE_DIFFERENCES = 2


def _dense_in_sample(pair: SessionPair, chunk: ChunkSpec, group: queries.Where, tally: _Tally) -> bool:
    """Whether a sample of the chunk's rows (source keys of random pages, `queries.sampled_page_keys`,
    read in full on both sides, `_diff_in_full`) shows dense differences (see `SAMPLE_KEYS`)."""
    spec = chunk.table
    rows = spec.estimated_rows / chunk.bucket_groups
    if rows < 10 * SAMPLE_KEYS:
        return False
    percent = min(100.0, 100.0 * SAMPLE_KEYS * chunk.bucket_groups / max(1, spec.estimated_rows))
    query, params = queries.sampled_page_keys(spec, percent, group, SAMPLE_KEYS)
    keys = [tuple(str(v) for v in row) for row in fetch_all(pair.source, query, params)]
    if not keys:
        return False
    differing = sum(1 for d in _diff_in_full(pair, spec, keys, "sample of rows", tally) if d is not None)
    if differing < DENSE_SAMPLE_DIFFERENCES:
        return False
    tally.notes.append(f"{differing:,} of {len(keys):,} sampled rows differed: every row read at once, no bucket scan")
    return True


def _stream_buckets(
    pair: SessionPair,
    spec: TableSpec,
    key_buckets: KeyBuckets,
    chosen: Sequence[int] | None,
    group: queries.Where,
    settings: Mapping[str, str],
    progress: tuple[str, int | None],
    tally: _Tally,
) -> tuple[int, int]:
    """The rows of the `chosen` buckets (None: every row of the `group`), sorted by key by the servers
    and streamed, diffed as they come: the rows each side sent. `progress` is the step's name and its
    total (the source's rows in those buckets, when known)."""
    step, total = progress

    def streamed(rows: int) -> None:
        tally.step(step, rows, total, "rows")

    streamed(0)
    layout = RecordLayout.of(spec.key_types)
    if layout is None:
        counts, diff = _stream_pairs(
            pair,
            queries.bucket_lines(spec, key_buckets, chosen, group),
            settings,
            LineFrames,
            lambda source, target: diff_line_streams(source, target, len(spec.key)),
            streamed,
        )
    else:
        size = layout.record.size
        counts, diff = _stream_pairs(
            pair,
            queries.bucket_records(spec, key_buckets, chosen, group),
            settings,
            lambda: RecordFrames(size),
            lambda source, target: diff_record_streams(source, target, layout, frame=RECORD_FRAME),
            streamed,
        )
    tally.rows_fetched += sum(counts)
    tally.add(diff)
    return counts


def _stream_pairs(
    pair: SessionPair,
    query: tuple[sql.Composable, Sequence[Any]],
    settings: Mapping[str, str],
    frames: Callable[[], Frames],
    diff: Callable[[Iterator[bytes], Iterator[bytes]], HashDiff],
    on_source_rows: Callable[[int], None],
) -> tuple[tuple[int, int], HashDiff]:
    """Run a query on both sides as COPY streams and diff them as they arrive (`session.CopyStream`):
    the rows each side sent, and the differing keys. `on_source_rows` hears the source's rows so far
    with each of its blocks."""
    statement, params = query
    with (
        CopyStream(pair.source, statement, params, frames(), settings) as source,
        CopyStream(pair.target, statement, params, frames(), settings) as target,
    ):
        found = diff(_reporting(source, on_source_rows), iter(target))
    return (source.frames.rows, target.frames.rows), found


def _reporting(stream: CopyStream, on_rows: Callable[[int], None]) -> Iterator[bytes]:
    for block in stream:
        on_rows(stream.frames.rows)
        yield block


def _key_buckets(pair: SessionPair, spec: TableSpec, bits: int, *, grouped: bool) -> KeyBuckets | None:
    """The key's 2**bits buckets: an integer's equal widths between the least and greatest key either
    side holds (None when neither holds a row); any other key's hash's top bits, but a uuid's leading
    bits under the md5 row hash (md5 of the key's text costs more than its bytes). When the buckets are
    `grouped` (one chunk per group), an integer key's hash's top bits too: every chunk must see the
    same buckets, and the least and greatest key move while replication runs.

    A uuid's own hash (the fast row hash's) is cheaper than its leading bytes (uuid_send twice): 10M
    rows, a side, 4.77 CPU-s against 5.02 to count and hash the buckets, 0.85 against 1.26 to scan for
    the rows of 35 of them."""
    if spec.key_types == [UUID_KEY_TYPE] and spec.row_hash is RowHash.MD5:
        return UuidPrefixes(bits)
    if grouped or not _integer_key(spec):
        return KeyHashes(bits)
    query, params = queries.key_span(spec, KeyRange(None, None))
    spans = [s for s in pair.both(run_one(query, params)) if s is not None and s[0] is not None]
    if not spans:
        return None
    return integer_widths(min(int(s[0]) for s in spans), max(int(s[1]) for s in spans), bits)


def _note_first(pair: SessionPair, chunk: ChunkSpec, tally: _Tally) -> None:
    if chunk.replication is not None and tally.first_lsn is None:
        tally.first_lsn = source_position(pair.source)


def _integer_key(spec: TableSpec) -> bool:
    """A single integer key: cut at equal widths of its values."""
    return len(spec.key) == 1 and spec.key_types[0] in INTEGER_KEY_TYPES


def _cut(
    pair: SessionPair, spec: TableSpec, key_range: KeyRange, expected_rows: int, range_rows: int
) -> Sequence[KeyRange]:
    """The piece cut into ranges of about `range_rows` rows.

    A single integer key is cut at equal widths between the least and greatest key either side
    holds (two index probes per side). Other keys are cut at keys sampled at random on the source
    (an index-only scan of the piece): cuts are only boundaries, both sides are read between the
    same ones.
    """
    if _integer_key(spec):
        query, params = queries.key_span(spec, key_range)
        spans = [s for s in pair.both(run_one(query, params)) if s is not None and s[0] is not None]
        if not spans:
            return [key_range]
        low, high = min(int(s[0]) for s in spans), max(int(s[1]) for s in spans)
        return even_ranges(key_range, low, high, expected_rows, range_rows)
    if expected_rows <= range_rows:
        return [key_range]
    query, params = queries.sampled_keys(spec, key_range, range_rows)
    cuts = [tuple(str(v) for v in row) for row in fetch_all(pair.source, query, params)]
    return ranges_between(key_range, cuts)


def _compare_ranges(
    pair: SessionPair, chunk: ChunkSpec, ranges: Sequence[KeyRange], tally: _Tally, *, depth: int
) -> tuple[int, int]:
    """Compare ranges by aggregate, then fetch or split the differing ones: (rows, differing keys) found."""
    spec = chunk.table
    query, params = queries.range_aggregates(spec, ranges)
    src_row, tgt_row = pair.both(run_one_raw(query, params))
    _note_first(pair, chunk, tally)
    assert src_row is not None and tgt_row is not None
    source_rows, target_rows = int(src_row[0]), int(tgt_row[0])
    if depth == 0:  # split parts re-count rows their range already counted
        tally.source_rows += source_rows
        tally.target_rows += target_rows
    tally.slices += len(ranges)
    mismatched = mismatched_ranges(src_row[1], tgt_row[1])
    tally.slices_mismatched += len(mismatched)
    found = 0
    fetch: list[int] = []
    for i, source, target in mismatched:
        decision = decide(source, target, chunk.slice_rows, depth=depth)
        if decision.step is Step.SPLIT:
            parts = _split(pair, spec, ranges[i], source, target, decision.parts)
            if parts:
                tally.splits += 1
                found += _compare_ranges(pair, chunk, parts, tally, depth=depth + 1)[1]
                continue
        fetch.append(i)
    if fetch:
        found += _fetch_hashes(pair, chunk, ranges, fetch, tally)
    return max(source_rows, target_rows), found


def _compare_every_line(pair: SessionPair, chunk: ChunkSpec, key_range: KeyRange, tally: _Tally) -> tuple[int, int]:
    """Dense differences: every row's (key, hash) line of the piece, read once on each side and
    diffed, with no aggregate: (rows, differing keys) found."""
    spec = chunk.table
    layout = RecordLayout.of(spec.key_types)
    query = queries.range_lines(spec, [key_range]) if layout is None else queries.range_records(spec, key_range)
    counts, diff = _read_pairs(pair, spec, layout, query)
    _note_first(pair, chunk, tally)
    tally.source_rows += counts[0]
    tally.target_rows += counts[1]
    tally.slices += 1
    tally.slices_mismatched += 1 if diff else 0
    tally.rows_fetched += counts[0] + counts[1]
    tally.add(diff)
    return max(counts), len(diff.keys)


def _read_pairs(
    pair: SessionPair, spec: TableSpec, layout: RecordLayout | None, query: tuple[sql.Composable, Sequence[Any]]
) -> tuple[tuple[int, int], HashDiff]:
    """Run a query of (key, hash) pairs on both sides and diff them: the rows each side sent, and the
    differing keys. Binary records (`queries.range_records`) where `layout` is known, else the count
    and `key<TAB>hash` lines (`queries.range_lines`)."""
    statement, params = query
    if layout is not None:
        source, target = (fields[0] or b"" for fields in pair.both(run_copy_row(statement, params)))
        size = layout.record.size
        return (len(source) // size, len(target) // size), diff_hash_records(source, target, layout)
    src_row, tgt_row = pair.both(run_one_raw(statement, params))
    assert src_row is not None and tgt_row is not None
    return (int(src_row[0]), int(tgt_row[0])), diff_hash_lines(src_row[1], tgt_row[1], len(spec.key))


def _split(
    pair: SessionPair, spec: TableSpec, key_range: KeyRange, source: Aggregate, target: Aggregate, parts: int
) -> list[KeyRange]:
    """Cut a range at key quantiles of the side holding more rows in it."""
    side = pair.source if source.rows >= target.rows else pair.target
    query, params = queries.quantiles(spec, key_range, quantile_step(max(source.rows, target.rows), parts))
    boundaries = [tuple(str(v) for v in row) for row in fetch_all(side, query, params)]
    return split_range(key_range, boundaries)


def _fetch_hashes(
    pair: SessionPair, chunk: ChunkSpec, ranges: Sequence[KeyRange], positions: Sequence[int], tally: _Tally
) -> int:
    """Fetch and diff the (key, hash) lines of the ranges at `positions` (one statement per side):
    the number of differing keys found."""
    spec = chunk.table
    query, params = queries.range_lines(spec, ranges, positions)
    src_row, tgt_row = pair.both(run_one_raw(query, params))
    assert src_row is not None and tgt_row is not None
    tally.rows_fetched += int(src_row[0]) + int(tgt_row[0])
    diff = diff_hash_lines(src_row[1], tgt_row[1], len(spec.key))
    tally.add(diff)
    if not diff and chunk.replication is None:
        # Only a write between the two reads explains this (a 64-bit collision aside).
        tally.notes.append(
            f"{len(positions)} range(s) whose aggregates differed had equal rows when fetched: data changed "
            f"during the compare (first range {RangeSpec.of(ranges[positions[0]]).model_dump()})"
        )
    return len(diff.keys)


def _read_rows(
    conn: Connection,
    spec: TableSpec,
    keys: Sequence[Key],
    *,
    with_version: bool,
    on_keys: Callable[[int], None] | None = None,
) -> tuple[list[Key], dict[Key, RowImage]]:
    """Each key's row image on one side (its column hashes), and the keys in that side's key order;
    `on_keys` hears how many keys were read so far, batch by batch."""
    order: list[Key] = []
    images: dict[Key, RowImage] = {}
    for start in range(0, len(keys), READ_BATCH):
        batch = keys[start : start + READ_BATCH]
        query, params = queries.row_images(spec, batch, with_version=with_version)
        batch_order, batch_images = parse_row_images(
            run_copy_row(query, params)(conn)[0] or b"", len(spec.columns), batch
        )
        order += batch_order
        images.update(batch_images)
        if on_keys is not None:
            on_keys(start + len(batch))
    return order, images


def _resolve(
    pair: SessionPair, spec: TableSpec, keys: list[Key], tally: _Tally
) -> tuple[list[RowDifference], list[Key]]:
    """Without replication: read the candidate rows in full once and diff them by column."""
    if not keys:
        return [], []
    differences: list[RowDifference] = []
    for difference in _diff_in_full(pair, spec, keys, "differing rows", tally):
        if difference is None:
            tally.transient += 1  # equal when read in full: changed between the reads
        else:
            differences.append(difference)
    return differences, []


def _diff_in_full(
    pair: SessionPair, spec: TableSpec, keys: Sequence[Key], step: str, tally: _Tally
) -> list[RowDifference | None]:
    """Each key's row read in full on both sides (`_read_rows`, batch by batch reported as `step`) and
    diffed by column, in the source's key order: its difference, or None where both sides are equal."""

    def read(conn: Connection) -> tuple[list[Key], dict[Key, RowImage]]:
        on_keys = (lambda done: tally.step(step, done, len(keys), "keys")) if conn is pair.source else None
        return _read_rows(conn, spec, keys, with_version=False, on_keys=on_keys)

    tally.step(step, 0, len(keys), "keys")
    (order, source), (_, target) = pair.both(read)
    columns = spec.column_names
    return [diff_row(key, columns, source[key], target[key]) for key in order]


def _recheck(
    pair: SessionPair, chunk: ChunkSpec, replication: Replication, keys: list[Key], tally: _Tally
) -> tuple[list[RowDifference], list[Key]]:
    """While replication runs: keep only what still differs once the target has caught up (`rowdiff.settle`)."""
    spec = chunk.table
    differences: list[RowDifference] = []
    pending = keys
    seen: dict[Key, str | None] = {}
    for _ in range(replication.attempts):
        if not pending:
            break
        tally.step("re-checking differing rows", len(keys) - len(pending), len(keys), "keys")
        order, first = _read_rows(pair.source, spec, pending, with_version=True)
        position = source_position(pair.source)
        if tally.first_lsn is not None:
            position = max(position, tally.first_lsn)
        try:
            wait_applied(pair, replication, position)
        except TimeoutError as exc:  # LsnWaitTimeout, or a catch-up hook's (change stream, DMS)
            tally.notes.append(f"re-check stopped: {exc}")
            break
        _, target = _read_rows(pair.target, spec, pending, with_version=True)
        _, second = _read_rows(pair.source, spec, pending, with_version=True)
        outcome = settle(order, spec.column_names, first, target, second, seen)
        tally.transient += len(outcome.resolved)
        differences += outcome.persistent
        pending, seen = outcome.retry, outcome.extra_seen
    return _in_order(differences, keys), pending


def _in_order(differences: list[RowDifference], keys: list[Key]) -> list[RowDifference]:
    position = {key: i for i, key in enumerate(keys)}
    return sorted(differences, key=lambda d: position.get(d.key, len(position)))


def _result(chunk: ChunkSpec, tally: _Tally, differences: list[RowDifference], unsettled: list[Key]) -> ChunkResult:
    first = chunk.first_keys
    by_kind: dict[Kind, list[RowDifference]] = {kind: [] for kind in Kind}
    changed_columns: dict[str, int] = {}
    for difference in differences:
        by_kind[difference.kind].append(difference)
        for column in difference.columns:
            changed_columns[column] = changed_columns.get(column, 0) + 1

    def listed(items: list[RowDifference]) -> DiffList:
        # One validation of plain data for the whole list: a model per key costs far more (a bench lists 100,000).
        return DiffList.model_validate(
            {"count": len(items), "first": [{"key": d.key, "columns": d.columns} for d in items[:first]]}
        )

    return ChunkResult(
        table=chunk.table.label,
        chunk=chunk.number,
        chunks=chunk.chunks,
        source_rows=tally.source_rows,
        target_rows=tally.target_rows,
        slices=tally.slices,
        slices_mismatched=tally.slices_mismatched,
        splits=tally.splits,
        rows_fetched=tally.rows_fetched,
        missing=listed(by_kind[Kind.MISSING]),
        extra=listed(by_kind[Kind.EXTRA]),
        changed=listed(by_kind[Kind.CHANGED]),
        unsettled=DiffList(count=len(unsettled), first=[KeyDiff(key=list(k)) for k in unsettled[:first]]),
        transient=tally.transient,
        changed_columns=dict(sorted(changed_columns.items())),
        first_lsn=str(tally.first_lsn) if tally.first_lsn is not None else None,
        notes=tally.notes,
    )


# -- tables without a primary key: multisets -------------------------------------------------


def _compare_multiset(pair: SessionPair, chunk: ChunkSpec, tally: _Tally) -> ChunkResult:
    """Count and hash sum of all rows; if they differ, buckets of the row hash, then the rows in differing buckets."""
    spec = chunk.table
    tally.slices = 1
    tally.step("count and hash of all rows", 0, None, "rows")
    query, params = queries.whole_aggregate(spec)
    src_row, tgt_row = pair.both(run_one(query, params))
    _note_first(pair, chunk, tally)
    assert src_row is not None and tgt_row is not None
    source, target = Aggregate(int(src_row[0]), str(src_row[1])), Aggregate(int(tgt_row[0]), str(tgt_row[1]))
    tally.source_rows, tally.target_rows = source.rows, target.rows
    diff = MultisetDiff()
    unsettled: list[str] = []
    if source != target:
        tally.slices_mismatched = 1
        bits = multiset_bits(max(source.rows, target.rows))
        tally.step("row hash buckets", 0, None, "rows")
        query, params = queries.bucket_aggregates(spec, bits)
        src_buckets, tgt_buckets = pair.both(run_query(query, params))
        src_agg = {int(b): Aggregate(int(n), str(s)) for b, n, s in src_buckets}
        tgt_agg = {int(b): Aggregate(int(n), str(s)) for b, n, s in tgt_buckets}
        buckets = mismatched_buckets(src_agg, tgt_agg)
        empty = Aggregate(0, "0")
        in_buckets = max(
            sum(src_agg.get(b, empty).rows for b in buckets), sum(tgt_agg.get(b, empty).rows for b in buckets)
        )
        if in_buckets > MULTISET_FETCH_LIMIT:
            # Too many rows to list: report lower bounds, bucket by bucket: the copies one side has in
            # excess, and in a bucket whose counts agree (its sums do not) at least one row each way.
            tally.notes.append(
                f"{in_buckets:,} rows in differing hash buckets: too many to list; counts are lower bounds"
            )
            pairs = [(src_agg.get(b, empty).rows, tgt_agg.get(b, empty).rows) for b in buckets]
            missing = sum(max(s - t, 1 if s == t else 0) for s, t in pairs)
            extra = sum(max(t - s, 1 if s == t else 0) for s, t in pairs)
            result = _multiset_result(chunk, tally, MultisetDiff(), [])
            return result.model_copy(update={"missing": DiffList(count=missing), "extra": DiffList(count=extra)})
        query, params = queries.bucket_rows(spec, bits, buckets)
        src_rows, tgt_rows = pair.both(run_query(query, params))
        tally.rows_fetched = sum(int(n) for _, n in src_rows) + sum(int(n) for _, n in tgt_rows)
        diff = multiset_diff({r: int(n) for r, n in src_rows}, {r: int(n) for r, n in tgt_rows})
        if chunk.replication is not None:
            diff, unsettled = _recheck_multiset(pair, chunk, chunk.replication, diff, tally)
    return _multiset_result(chunk, tally, diff, unsettled)


def _copies(conn: Connection, spec: TableSpec, rows: Sequence[str]) -> dict[str, int]:
    query, params = queries.row_copies(spec, rows)
    return {r: int(n) for r, n in fetch_all(conn, query, params)}


def _recheck_multiset(
    pair: SessionPair, chunk: ChunkSpec, replication: Replication, diff: MultisetDiff, tally: _Tally
) -> tuple[MultisetDiff, list[str]]:
    spec = chunk.table
    pending = [*diff.missing, *diff.extra]
    persistent = MultisetDiff()
    seen: dict[str, int] = {}
    for _ in range(replication.attempts):
        if not pending:
            break
        first = _copies(pair.source, spec, pending)
        position = source_position(pair.source)
        if tally.first_lsn is not None:
            position = max(position, tally.first_lsn)
        try:
            wait_applied(pair, replication, position)
        except TimeoutError as exc:  # LsnWaitTimeout, or a catch-up hook's (change stream, DMS)
            tally.notes.append(f"re-check stopped: {exc}")
            break
        target = _copies(pair.target, spec, pending)
        second = _copies(pair.source, spec, pending)
        resolved, found, pending, seen = settle_multiset(pending, first, target, second, seen)
        tally.transient += len(resolved)
        persistent.missing.update(found.missing)
        persistent.extra.update(found.extra)
    return persistent, pending


def _shown(row: str) -> str:
    return row if len(row) <= MAX_ROW_TEXT else row[: MAX_ROW_TEXT - 1] + "…"


def _multiset_result(chunk: ChunkSpec, tally: _Tally, diff: MultisetDiff, unsettled: list[str]) -> ChunkResult:
    first = chunk.first_keys

    def listed(rows: dict[str, int]) -> DiffList:
        return DiffList(
            count=sum(rows.values()),
            first=[KeyDiff(key=[_shown(r)], copies=n) for r, n in list(rows.items())[:first]],
        )

    return ChunkResult(
        table=chunk.table.label,
        chunk=chunk.number,
        chunks=chunk.chunks,
        multiset=True,
        source_rows=tally.source_rows,
        target_rows=tally.target_rows,
        slices=tally.slices,
        slices_mismatched=tally.slices_mismatched,
        rows_fetched=tally.rows_fetched,
        missing=listed(diff.missing),
        extra=listed(diff.extra),
        unsettled=DiffList(count=len(unsettled), first=[KeyDiff(key=[_shown(r)]) for r in unsettled[:first]]),
        transient=tally.transient,
        first_lsn=str(tally.first_lsn) if tally.first_lsn is not None else None,
        notes=tally.notes,
    )
