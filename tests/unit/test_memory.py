"""memory.release_freed_memory gives freed heap pages back to the system (glibc's malloc_trim)."""

from __future__ import annotations

import subprocess
import sys

from syncmesh_plugin import memory

PROBE = r"""
import sys
from syncmesh_plugin import memory

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

memory.release_freed_memory()
base = anon_kib()
bufs = [bytearray(100_000) for _ in range(2000)]  # 200 MB below the mmap threshold: on the heap
pins = [bytearray(600) for _ in range(2000)]      # small blocks above them keep the heap from shrinking
for b in bufs:
    b[::4096] = b"x" * len(b[::4096])              # touched: resident
del bufs
held = anon_kib()
released = memory.release_freed_memory()
after = anon_kib()
print(base, held, after, released)
"""


def test_freed_heap_pages_go_back_to_the_system() -> None:
    assert memory.can_release(), "glibc's malloc_trim not found (this test expects glibc)"
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    base, held, after, released = out.stdout.split()
    base_k, held_k, after_k = int(base), int(held), int(after)
    assert held_k - base_k > 150_000, f"the freed buffers should still be held before the release: {out.stdout}"
    assert released == "True"
    assert held_k - after_k > 150_000, f"released {held_k - after_k} KiB of about 200 MB freed"


def test_arenas_are_limited_where_glibc_allows() -> None:
    assert memory.limit_malloc_arenas(), "mallopt(M_ARENA_MAX) refused or glibc not found"
