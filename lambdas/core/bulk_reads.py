"""Process settings for a process that reads large results: the validator's command line and chunk Lambda.

Set once, by the entry point (the command line's main, a handler module at cold start), never by
the domain code: both are process-wide.

- glibc's allocator maps each buffer over its mmap threshold afresh and gives freed memory at the
  heap's top back to the kernel, so every megabyte-sized result (a chunk's 1.6 MB of records,
  copied from libpq to a bytes object and on) page-faults its pages in again: measured on 10M
  rows, 183,000 page faults and 0.6 CPU-s in the kernel for reading 160 MB, against 9,000 and
  0.14 s with freed memory kept (`MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_`).
- CPython's cyclic garbage collector runs a generation-0 pass every 700 new container objects and
  a full pass (every object of the process) every 100 of those: a chunk with 1,000 differing rows
  builds tens of thousands (keys, row images, results) and nearly none in cycles. Measured on 10M
  rows with 1% of them differing: 2.50 client CPU-s with the default thresholds, 1.85 with
  (50,000, 10, 10), 1.77 with the collector off.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before it is given back
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit: buffers below it come from the heap
GC_THRESHOLDS = (50_000, 10, 10)


@dataclass(frozen=True)
class BulkReadTuning:
    allocator: bool  # glibc took the mallopt settings (False elsewhere: musl, macOS)
    gc_thresholds: tuple[int, ...]


def tune_for_bulk_reads(libc: str | None = "libc.so.6") -> BulkReadTuning:
    """Keep freed memory for reuse and collect cyclic garbage less often. Safe to call again."""
    gc.set_threshold(*GC_THRESHOLDS)
    return BulkReadTuning(allocator=_keep_freed_memory(libc), gc_thresholds=gc.get_threshold())


def _keep_freed_memory(libc: str | None) -> bool:
    if libc is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
