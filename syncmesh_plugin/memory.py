"""Hand the memory the C allocator holds free back to the system.

Python frees a moved file's buffers (chunks, waves of a big file, TLS records), but glibc keeps the pages
in its heaps for reuse: a daemon that moved a big file or ten thousand small ones carried 20-30 MB into the
next transfer, and its resident size only grew. `malloc_trim(0)` returns the free pages of every heap;
on a heap of a hundred megabytes it takes well under a millisecond. Without glibc (musl) it is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

RELEASE_INTERVAL = 2.0  # seconds between two releases: carry-over gone before the next burst of work


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def can_release() -> bool:
    return _TRIM is not None


def release_freed_memory() -> bool:
    """Give free heap pages back; True when the allocator released any."""
    return bool(_TRIM(0)) if _TRIM is not None else False


async def release_loop(interval: float = RELEASE_INTERVAL) -> None:
    """For the daemon's life: release what the last seconds of work freed."""
    if _TRIM is None:
        return
    while True:
        await asyncio.sleep(interval)
        release_freed_memory()
