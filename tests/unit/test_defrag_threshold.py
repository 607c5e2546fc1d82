"""Housekeeping decisions that need no etcd: when a member's database file is worth defragmenting."""

from __future__ import annotations

import pytest

from syncmesh_plugin.housekeeping import needs_defrag

MIB = 2**20


@pytest.mark.parametrize(("size", "in_use", "want"), [
    (0, 0, False),  # nothing
    (64 * MIB, 10 * MIB, False),  # small files are left alone
    (65 * MIB, 10 * MIB, True),
    (200 * MIB, 100 * MIB, False),  # half free: not yet
    (200 * MIB, 99 * MIB, True),
    (200 * MIB, 0, False),  # a member that did not say how much is in use
])
def test_needs_defrag(size: int, in_use: int, want: bool) -> None:
    assert needs_defrag(size, in_use) is want
