"""Allocator tuning for processes that allocate and free MB-sized arrays per image or batch (glibc ``mallopt``):
the data pipeline's read/decode tasks, the training workers that consume its batches, and the benchmarks that
stand in for either. No pconv imports, no Ray."""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

# glibc malloc settings (mallopt(3); the parameter numbers are M_TRIM_THRESHOLD and M_MMAP_THRESHOLD from malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 64 * 2**20   # allocations below this come from the heap, whose freed memory is reused
MALLOC_TRIM_THRESHOLD = 128 * 2**20  # freed heap kept per process before it goes back to the OS
OPT_OUT_VAR = "PCONV_MALLOC_TUNING"  # "0" in a process's environment turns the tuning off there


@functools.cache
def reuse_freed_memory() -> bool:
    """Make this process's allocator reuse freed large buffers instead of page-faulting fresh ones (glibc only;
    once per process; True if applied). Opt out with ``PCONV_MALLOC_TUNING=0`` in the workers' environment.

    glibc serves an allocation above its mmap threshold (128 KB, adapting up to 32 MB) with a fresh ``mmap`` and
    unmaps it on free, and trims the heap top beyond the trim threshold: every decoded image, output row block
    and batch then costs kernel page faults (each 4 KB page zeroed) on first touch. Measured with
    ``benchmarks/data_throughput.py`` (512 px, 2 CPUs): a decode task took ~115 minor faults per image and 8 % of
    its CPU time in the kernel; with this, ~15 faults and 3 % (the consumer's faults fell from ~2,000 to ~700 per
    second as well).
    Cost: up to ``MALLOC_TRIM_THRESHOLD`` of freed memory stays with each process that calls it.
    Called by the read/decode tasks (:mod:`pconv.data.stream`) and the training workers (the batch consumers).
    """
    import ctypes
    import ctypes.util
    import platform

    if os.environ.get(OPT_OUT_VAR, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
    except (OSError, AttributeError) as e:  # pragma: no cover - a libc without mallopt
        log.debug("malloc tuning not applied: %s", e)
        return False
    if not ok:  # pragma: no cover
        log.debug("malloc tuning: mallopt refused the thresholds")
    return ok
