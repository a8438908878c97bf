"""Process settings for large results: freed memory kept by glibc's allocator, the cyclic collector run less often."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lambdas.core.bulk_reads import GC_THRESHOLDS, tune_for_bulk_reads

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# What reading one chunk's records does (`session.run_copy_row`), 100 times: a binary COPY stream
# written into a BytesIO, read back and its field sliced out; prints the page faults taken.
_READ_RECORDS = textwrap.dedent(
    """
    import io, resource, sys
    if sys.argv[1] == "tuned":
        from lambdas.core.bulk_reads import tune_for_bulk_reads
        assert tune_for_bulk_reads().allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        buffer = io.BytesIO()
        buffer.write(b"PGCOPY-header-and-length")
        buffer.write(b"x" * 1_600_000)
        data = buffer.getvalue()
        field = data[24:]
        del buffer, data, field
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _READ_RECORDS, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return int(done.stdout.strip())


@pytest.fixture
def restore_gc_thresholds():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_tuning_sets_the_collector_thresholds(restore_gc_thresholds):
    # Given the default thresholds
    gc.set_threshold(700, 10, 10)
    # When the process is tuned, twice (a warm Lambda's module is imported once, a command may call it again)
    tune_for_bulk_reads(libc=None)
    tuning = tune_for_bulk_reads(libc=None)
    # Then the collector runs its passes less often, and no allocator was touched
    assert gc.get_threshold() == GC_THRESHOLDS
    assert tuning.gc_thresholds == GC_THRESHOLDS
    assert tuning.allocator is False


def test_a_library_without_mallopt_leaves_the_allocator_alone(restore_gc_thresholds):
    assert tune_for_bulk_reads(libc="libno-such-library.so.0").allocator is False


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # Given a process that reads 100 results of 1.6 MB the way the validator does
    # When it runs untuned and tuned
    untuned, tuned = page_faults("untuned"), page_faults("tuned")
    # Then untuned, the buffers' pages fault in afresh each time (about 750 per result); tuned, freed memory is reused
    assert untuned > 20_000
    assert tuned < untuned / 10
