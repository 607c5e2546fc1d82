"""Keep the C allocator from holding memory the daemon no longer uses.

glibc gives every worker thread its own malloc arena; with hashing and file I/O in a thread pool that
alone cost tens of MB of RSS, so the daemon limits it to two before any thread starts.

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
ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_TRIM = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas (call before threads start); False without glibc."""
    return bool(_MALLOPT(M_ARENA_MAX, arenas)) if _MALLOPT is not None else False


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
