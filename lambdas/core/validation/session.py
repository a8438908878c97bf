"""A source and a target session that run the same statement at the same time.

Both sessions pin the settings that change a row's text form (`textform.pin_text_form`) and are
read-only. `both(fn)` runs `fn(source)` on a helper thread while `fn(target)` runs on the caller's
(psycopg2 releases the GIL while a statement runs), so a range is read on both servers at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any, TypeVar

import psycopg2.extensions
from psycopg2 import sql

from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_one, unbound_session
from lambdas.core.textform import pin_text_form

T = TypeVar("T")

APPLICATION_NAME = "zdm-validate"


def prepare_session(conn: Connection) -> None:
    """Pinned text form and read-only transactions: the validator never writes.

    JIT off: a statement comparing many ranges is costed high enough to be JIT-compiled, which
    takes longer (0.1 to 0.2 s per statement with the row hash) than running a chunk's statement.
    No parallel query: chunks already run side by side (the Map, the workers), and a chunk's
    statement is too short to pay for starting workers (measured: 2M rows compared chunk by chunk
    took 2.16 CPU-s with parallel index scans, 1.6 without; one scan of the table 1.53).
    No statement or idle-in-transaction timeout of the server's (`db.unbound_session`): a chunk's
    statements read hundreds of thousands of rows; the task's own time limit bounds them.
    Read committed whatever the server's default: each statement reads its own snapshot anyway, and
    under SERIALIZABLE every row read would leave a predicate lock the application's serializable
    transactions then conflict with.
    row_security off: PostgreSQL then refuses a read its policies would filter (the planner already
    reports such tables), instead of silently leaving rows out of the compare.
    """
    pin_text_form(conn)
    unbound_session(conn)
    execute(
        conn,
        "SET default_transaction_read_only = on; SET default_transaction_isolation = 'read committed';"
        " SET jit = off; SET max_parallel_workers_per_gather = 0; SET row_security = off",
    )


class SessionPair:
    """One connection to each side; closing the pair closes both."""

    def __init__(self, source: Connection, target: Connection) -> None:
        self.source = source
        self.target = target
        # How to wait until the target has applied the source's changes so far, when they arrive by
        # something other than a subscription (the debezium engine's change stream, DMS); set by the
        # handler. Raises TimeoutError when the target is not there in time.
        self.catch_up: Callable[[], None] | None = None
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdm-validate-source")

    @classmethod
    def open(cls, source_dsn: str, target_dsn: str, *, connector: Callable[..., Connection] = connect) -> SessionPair:
        source = connector(source_dsn, application_name=APPLICATION_NAME)
        try:
            target = connector(target_dsn, application_name=APPLICATION_NAME)
        except BaseException:
            source.close()
            raise
        pair = cls(source, target)
        try:
            pair.both(prepare_session)
        except BaseException:
            pair.close()
            raise
        return pair

    def both(self, fn: Callable[[Connection], T]) -> tuple[T, T]:
        """(fn(source), fn(target)), run at the same time; the first error is raised after both ended."""
        future = self._helper.submit(fn, self.source)
        try:
            on_target = fn(self.target)
        except BaseException:
            future.exception()  # wait: never leave the source statement running behind our back
            raise
        return future.result(), on_target

    def close(self) -> None:
        self._helper.shutdown(wait=True)
        for conn in (self.source, self.target):
            if not conn.closed:
                conn.close()

    def __enter__(self) -> SessionPair:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def run_with_settings(settings: Mapping[str, str], fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """`fn` with the session's settings changed, each put back after (set_config: names and values as parameters)."""

    def run(conn: Connection) -> T:
        names = list(settings)
        previous = fetch_all(
            conn, "SELECT current_setting(n) FROM unnest(%s::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i", (names,)
        )
        for name, value in settings.items():
            execute(conn, "SELECT set_config(%s, %s, false)", (name, value))
        try:
            return fn(conn)
        finally:
            if not conn.closed:
                for name, (value,) in zip(names, previous, strict=True):
                    execute(conn, "SELECT set_config(%s, %s, false)", (name, value))

    return run


def run_query(query: sql.Composable, params: Sequence[Any]) -> Callable[[Connection], list[tuple[Any, ...]]]:
    return lambda conn: fetch_all(conn, query, params)


def run_one(query: sql.Composable, params: Sequence[Any]) -> Callable[[Connection], tuple[Any, ...] | None]:
    return lambda conn: fetch_one(conn, query, params)


def run_one_raw(query: sql.Composable, params: Sequence[Any]) -> Callable[[Connection], tuple[Any, ...] | None]:
    """Like `run_one`, with text values left as the UTF-8 bytes the server sent (no decoding:
    large line lists are split and compared as bytes, and only differing lines are decoded)."""

    def run(conn: Connection) -> tuple[Any, ...] | None:
        with conn.cursor() as cur:
            psycopg2.extensions.register_type(psycopg2.extensions.BYTES, cur)
            cur.execute(query, params)
            return cur.fetchone()

    return run


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def run_copy_row(query: sql.Composable, params: Sequence[Any]) -> Callable[[Connection], list[bytes | None]]:
    """The one row a query returns, read through COPY in binary format: each field as the type's
    send function wrote it (None for NULL). A large bytea arrives as its bytes, not as hex text
    to be decoded (timed once, on a local server: 4 instead of 9.5 ms for 1.6 MB).
    """

    def run(conn: Connection) -> list[bytes | None]:
        buffer = BytesIO()
        copy_out(conn, query, params, "binary", buffer)
        return parse_copy_row(buffer.getvalue())

    return run


def copy_out(conn: Connection, query: sql.Composable, params: Sequence[Any], copy_format: str, sink: Any) -> None:
    """`COPY (query) TO STDOUT` in `copy_format` into `sink` (a file-like object taking bytes). COPY takes no
    parameters, so the statement is composed with its values by psycopg2's own quoting (`mogrify`, what
    `execute` does as well)."""
    with conn.cursor() as cur:
        statement = cur.mogrify(query, params).decode(psycopg2.extensions.encodings[conn.encoding])
        cur.copy_expert(f"COPY ({statement}) TO STDOUT (FORMAT {copy_format})", sink)


def copy_header_length(data: bytes | bytearray) -> int | None:
    """The length of a binary COPY stream's header (signature, flags, extension), or None while `data`
    holds less than the whole header. ValueError when it is no binary COPY stream."""
    if len(data) < len(_COPY_SIGNATURE) + 8:
        if not _COPY_SIGNATURE.startswith(bytes(data[: len(_COPY_SIGNATURE)])):
            raise ValueError("not a binary COPY stream")
        return None
    if not data.startswith(_COPY_SIGNATURE):
        raise ValueError("not a binary COPY stream")
    extension = len(_COPY_SIGNATURE) + 4  # after the flags field
    length = extension + 4 + int.from_bytes(data[extension : extension + 4], "big")
    return length if len(data) >= length else None


def parse_copy_row(data: bytes) -> list[bytes | None]:
    """The fields of the single row of a binary COPY stream (header, one tuple, trailer)."""
    position = copy_header_length(data)
    if position is None:
        raise ValueError("a binary COPY stream of one row expected")
    count = int.from_bytes(data[position : position + 2], "big", signed=True)
    position += 2
    fields: list[bytes | None] = []
    for _ in range(max(0, count)):
        length = int.from_bytes(data[position : position + 4], "big", signed=True)
        position += 4
        if length < 0:
            fields.append(None)
            continue
        fields.append(data[position : position + length])
        position += length
    if count < 0 or data[position:] != b"\xff\xff":
        raise ValueError("a binary COPY stream of one row expected")
    return fields


# The bytes before each record in a binary COPY stream of one field a row: the field count (1), the length.
RECORD_FRAME = 6


class RecordFrames:
    """Cuts a binary COPY stream of one-field rows, every field `size` bytes (fixed-width records),
    into blocks of whole rows as they arrive: each row is its 6-byte frame (field count 1, length
    `size`) and its record, so blocks are diffed as they are (`rowdiff.diff_record_streams` with
    frame=`FRAME`) with nothing parsed per row. Every frame is checked (strided slices, C speed):
    a NULL or a field of another width would shift every record after it."""

    FRAME = RECORD_FRAME
    FORMAT = "binary"

    def __init__(self, size: int, block_bytes: int = 4 << 20) -> None:
        self.size = size
        self.rows = 0
        self._framed = self.FRAME + size
        self._expected = [bytes([b]) for b in (1).to_bytes(2, "big") + size.to_bytes(4, "big")]
        self._block_bytes = block_bytes
        self._buffer = bytearray()
        self._header_done = False

    def feed(self, data: bytes) -> list[bytes]:
        """The whole blocks the stream holds once `data` is added (none until `block_bytes` gathered)."""
        self._buffer += data
        if not self._header_done:
            header = copy_header_length(self._buffer)
            if header is None:
                return []
            del self._buffer[:header]
            self._header_done = True
        rows = len(self._buffer) // self._framed
        if len(self._buffer) < self._block_bytes or not rows:
            return []
        return [self._cut(rows)]

    def end(self) -> list[bytes]:
        """The last block, once the stream has ended; its trailer is checked."""
        rows, rest = divmod(len(self._buffer) - 2, self._framed)
        if not self._header_done or rest or rows < 0 or self._buffer[-2:] != b"\xff\xff":
            raise ValueError(f"a binary COPY stream of {self.size}-byte fields expected")
        block = self._cut(rows)
        return [block] if block else []

    def _cut(self, rows: int) -> bytes:
        block = bytes(self._buffer[: rows * self._framed])
        del self._buffer[: rows * self._framed]
        for offset, expected in enumerate(self._expected):
            if block[offset :: self._framed] != expected * rows:
                raise ValueError(f"a binary COPY stream of {self.size}-byte fields expected (a NULL or another width)")
        self.rows += rows
        return block


class LineFrames:
    """Cuts a COPY stream in text format (a line per row, fields tab-separated, backslash escapes) into
    blocks of whole lines as they arrive (`rowdiff.diff_line_streams`); nothing is parsed per row."""

    FORMAT = "text"

    def __init__(self, block_bytes: int = 4 << 20) -> None:
        self.rows = 0
        self._block_bytes = block_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        if len(self._buffer) < self._block_bytes:
            return []
        end = self._buffer.rfind(b"\n") + 1
        return [self._cut(end)] if end else []

    def end(self) -> list[bytes]:
        if self._buffer and not self._buffer.endswith(b"\n"):
            raise ValueError("a COPY stream in text format ends with a whole line")
        return [self._cut(len(self._buffer))] if self._buffer else []

    def _cut(self, end: int) -> bytes:
        block = bytes(self._buffer[:end])
        del self._buffer[:end]
        self.rows += block.count(b"\n")
        return block


Frames = RecordFrames | LineFrames


class CopyStream:
    """`COPY (query) TO STDOUT` (binary or text, as `frames` reads it) run on its own thread into a
    pipe, read back in large pieces and cut by `frames` into blocks: iterate it for the blocks. The
    pipe's buffer bounds what waits, so a side that runs ahead waits for the reader instead of filling
    memory. psycopg2 hands each row to the pipe's C writer: 10M random uuids all differing took 4.5
    client CPU-s in all, against 9.3 when a Python sink cut each row as it came.

    `close()` (or leaving the `with` block) cancels a statement still running, e.g. after the other
    side failed, and ends the copy by closing the pipe."""

    def __init__(
        self,
        conn: Connection,
        query: sql.Composable,
        params: Sequence[Any],
        frames: Frames,
        settings: Mapping[str, str] | None = None,
        read_bytes: int = 4 << 20,
    ) -> None:
        self.frames = frames
        self._conn = conn
        self._read_bytes = read_bytes
        read_end, write_end = os.pipe()
        # Held open past __init__: the reader is closed by close(), the writer by the copy's thread.
        self._reader = open(read_end, "rb", buffering=0)  # noqa: SIM115
        self._writer = open(write_end, "wb", buffering=1 << 20)  # noqa: SIM115
        self._pending: list[bytes] = []
        self._ended = False
        self._error: BaseException | None = None

        def copy(conn: Connection) -> None:
            copy_out(conn, query, params, frames.FORMAT, self._writer)

        self._copy = run_with_settings(settings, copy) if settings else copy
        self._thread = threading.Thread(target=self._run, name="zdm-validate-stream", daemon=True)

    def __enter__(self) -> CopyStream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> CopyStream:
        return self

    def __next__(self) -> bytes:
        while not self._pending:
            data = self._reader.read(self._read_bytes)
            if data:
                self._pending = self.frames.feed(data)
                continue
            self._thread.join()  # the pipe ended: the copy is over, or failed
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopIteration
            self._ended = True
            self._pending = self.frames.end()
        return self._pending.pop(0)

    def close(self) -> None:
        if self._thread.is_alive():
            self._conn.cancel()  # a statement still running (sorting, say) stops now, not when done
        self._reader.close()  # a write still to come fails (a broken pipe), which ends the copy
        self._thread.join()

    def _run(self) -> None:
        try:
            self._copy(self._conn)
        except BaseException as exc:  # handed to the reader
            self._error = exc
        finally:
            with contextlib.suppress(OSError):  # the reader closed its end first
                self._writer.close()
