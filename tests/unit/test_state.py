"""Tests for syncmesh_plugin.state.LocalState (SQLite under a tmp dir)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncmesh_plugin.state import FileRecord, LocalState

C1, C2, C3 = "1" * 32, "2" * 32, "3" * 32


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def st(state_dir: str) -> Iterator[LocalState]:
    s = LocalState(state_dir)
    yield s
    s.close()


def test_creates_private_state_dir(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b" / "state"
    s = LocalState(str(d))
    try:
        assert os.path.isfile(s.path)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    finally:
        s.close()


# ---- mounts


def test_mount_refcounts(st: LocalState) -> None:
    assert st.mounts("v") == {}
    assert st.add_mount("v", "c1") == 1
    assert st.add_mount("v", "c1") == 2
    assert st.add_mount("v", "c2") == 3
    assert st.add_mount("w", "c1") == 1  # other volume counted separately
    assert st.mounts("v") == {"c1": 2, "c2": 1}
    assert st.remove_mount("v", "c1") == 2
    assert st.mounts("v") == {"c1": 1, "c2": 1}
    assert st.remove_mount("v", "c1") == 1
    assert st.mounts("v") == {"c2": 1}  # a zero count row is gone
    assert st.remove_mount("v", "unknown") == 1
    assert st.all_mounts() == {"v": {"c2": 1}, "w": {"c1": 1}}
    st.clear_mounts("v")
    assert st.mounts("v") == {}
    assert st.mounts("w") == {"c1": 1}


def test_mounts_persist_across_close_and_reopen(state_dir: str) -> None:
    s = LocalState(state_dir)
    s.add_mount("v", "c1")
    s.add_mount("v", "c1")
    s.add_mount("v", "c2")
    s.remove_mount("v", "c2")
    s.close()
    s2 = LocalState(state_dir)
    try:
        assert s2.mounts("v") == {"c1": 2}
        assert s2.remove_mount("v", "c1") == 1
    finally:
        s2.close()
    s3 = LocalState(state_dir)
    try:
        assert s3.all_mounts() == {"v": {"c1": 1}}
    finally:
        s3.close()


# ---- held volumes and revisions


def test_held_revision_only_increases(st: LocalState) -> None:
    st.hold("v")
    assert st.held() == {"v": 0}
    assert st.revision("v") == 0
    st.set_revision("v", 10)
    assert st.revision("v") == 10
    st.set_revision("v", 3)
    assert st.revision("v") == 10
    st.set_revision("v", 10)
    assert st.revision("v") == 10
    st.set_revision("v", 11)
    assert st.revision("v") == 11
    assert st.held() == {"v": 11}


def test_hold_is_idempotent_and_keeps_revision(st: LocalState) -> None:
    st.hold("v")
    st.set_revision("v", 5)
    st.hold("v")
    assert st.revision("v") == 5


def test_set_revision_on_unheld_volume_is_a_no_op(st: LocalState) -> None:
    st.set_revision("ghost", 7)
    assert st.revision("ghost") == 0
    assert st.held() == {}


def test_synced_flag(st: LocalState) -> None:
    assert not st.is_synced("v")
    st.hold("v")
    assert not st.is_synced("v")
    st.set_synced("v")
    assert st.is_synced("v")
    st.set_synced("v", False)
    assert not st.is_synced("v")


def test_revision_persists(state_dir: str) -> None:
    s = LocalState(state_dir)
    s.hold("v")
    s.set_revision("v", 42)
    s.set_synced("v")
    s.close()
    s2 = LocalState(state_dir)
    try:
        assert s2.revision("v") == 42
        assert s2.is_synced("v")
    finally:
        s2.close()


# ---- file index


def rec(path: str, kind: str = "file", chunks: list[list[object]] | None = None, size: int = 0,
        volume: str = "v", published: bool = True) -> FileRecord:
    return FileRecord(volume=volume, path=path, kind=kind, size=size, mtime_ns=1, mode=0o644, digest="d" * 32,
                      chunks=chunks, rev=1, origin="n", published=published)


def test_put_files_and_chunk_locations(st: LocalState) -> None:
    st.put_files([rec("a.bin", chunks=[[C1, 100], [C2, 50], [C1, 100]], size=250),
                  rec("b.bin", chunks=[[C2, 50]], size=50)])
    assert sorted(st.chunk_locations(C1)) == [("v", "a.bin", 0, 100), ("v", "a.bin", 150, 100)]
    assert sorted(st.chunk_locations(C2)) == [("v", "a.bin", 100, 50), ("v", "b.bin", 0, 50)]
    assert st.chunk_locations(C3) == []
    assert len(st.chunk_locations(C2, limit=1)) == 1
    r = st.file("v", "a.bin")
    assert r is not None
    assert r.chunks == [[C1, 100], [C2, 50], [C1, 100]]
    assert (r.kind, r.size, r.mode, r.rev, r.origin, r.published) == ("file", 250, 0o644, 1, "n", True)


def test_put_files_replaces_chunk_rows_of_a_path(st: LocalState) -> None:
    st.put_files([rec("a.bin", chunks=[[C1, 10]], size=10)])
    st.put_files([rec("a.bin", chunks=[[C3, 20]], size=20)])
    assert st.chunk_locations(C1) == []
    assert st.chunk_locations(C3) == [("v", "a.bin", 0, 20)]
    r = st.file("v", "a.bin")
    assert r is not None and r.size == 20


def test_chunks_are_only_indexed_for_files(st: LocalState) -> None:
    st.put_files([rec("gone", kind="deleted", chunks=[[C1, 10]])])
    assert st.chunk_locations(C1) == []


def test_put_files_empty_is_a_no_op(st: LocalState) -> None:
    st.put_files([])
    assert list(st.files("v")) == []


def test_file_missing_and_chunks_none_stored_as_empty(st: LocalState) -> None:
    assert st.file("v", "nope") is None
    st.put_files([rec("d", kind="dir")])
    r = st.file("v", "d")
    assert r is not None and r.kind == "dir" and r.chunks == []


def test_files_prefix_returns_dir_and_children_only(st: LocalState) -> None:
    st.put_files([rec("p", kind="dir"), rec("p/a"), rec("p/sub", kind="dir"), rec("p/sub/b"),
                  rec("pX"), rec("pX/c"), rec("p.txt"), rec("q/p/a"), rec("p", volume="other")])
    assert [r.path for r in st.files("v", "p")] == ["p", "p/a", "p/sub", "p/sub/b"]
    assert [r.path for r in st.files("v", "p/sub")] == ["p/sub", "p/sub/b"]
    assert [r.path for r in st.files("v")] == ["p", "p.txt", "p/a", "p/sub", "p/sub/b", "pX", "pX/c", "q/p/a"]
    assert [r.path for r in st.files("other")] == ["p"]


def test_files_prefix_with_sql_wildcards_is_literal(st: LocalState) -> None:
    st.put_files([rec("a%", kind="dir"), rec("a%/x"), rec("ab/x"), rec("a_/y")])
    assert [r.path for r in st.files("v", "a%")] == ["a%", "a%/x"]


def test_children_and_stats_for_a_rescan(st: LocalState) -> None:
    st.put_files([rec("a", size=10), rec("d", kind="dir"), rec("d/x", size=3), rec("d/e/y", size=4),
                  rec("gone", kind="deleted")] + [rec(f"w/f{i}") for i in range(1200)])
    db = st.reader()
    try:
        assert set(LocalState.children(db, "v", "")) == {"a", "d"}  # tombstones are not live
        assert set(LocalState.children(db, "v", "d/e")) == {"d/e/y"}
        stats = LocalState.stats_for(db, "v", ["d/x", "gone", "nope", "d"])
        assert set(stats) == {"d/x", "d"} and stats["d/x"][:2] == ("file", 3)
        wide = [f"w/f{i}" for i in range(1200)]  # more than one IN (...) query
        assert len(LocalState.stats_for(db, "v", wide)) == 1200
        assert sum(1 for _ in LocalState.children(db, "v", "w")) == 1200
    finally:
        db.close()


def test_unseen_files_after_a_reconcile_read(st: LocalState) -> None:
    st.put_files([rec(f"f{i}") for i in range(5)] + [rec("dead", kind="deleted")])
    st.begin_seen()
    st.add_seen(["f1", "f3"])
    unseen = [r.path for batch in st.unseen_files("v", batch=2) for r in batch]
    assert unseen == ["f0", "f2", "f4"]


def test_volume_stats(st: LocalState) -> None:
    st.put_files([rec("a", size=10), rec("b", size=5, published=False), rec("c", kind="deleted", size=99)])
    assert st.volume_stats("v") == {"files": 2, "bytes": 15, "unpublished": 1}


def test_delete_files(st: LocalState) -> None:
    st.put_files([rec("a", chunks=[[C1, 1]], size=1), rec("b")])
    st.delete_files("v", ["a"])
    assert st.file("v", "a") is None
    assert st.file("v", "b") is not None
    assert st.chunk_locations(C1) == []


# ---- unhold


def test_unhold_clears_the_volume(st: LocalState) -> None:
    for vol in ("v", "w"):
        st.hold(vol)
        st.set_revision(vol, 3)
        st.add_mount(vol, "c1")
        st.put_files([rec("a", chunks=[[C1, 10]], size=10, volume=vol)])
        st.add_conflict(vol, "a", "a.sync-conflict-x", "timestamp", "n1", "n2", 1.0)
    st.put_volume("v", {"name": "v"}, 1)
    st.unhold("v")
    assert st.held() == {"w": 3}
    assert st.revision("v") == 0
    assert st.mounts("v") == {}
    assert list(st.files("v")) == []
    assert st.conflicts("v") == []
    assert st.chunk_locations(C1) == [("w", "a", 0, 10)]
    # the other volume is untouched, and the registry copy is not part of "held"
    assert st.mounts("w") == {"c1": 1}
    assert [r.path for r in st.files("w")] == ["a"]
    assert len(st.conflicts("w")) == 1
    assert st.volume("v") == {"name": "v"}


# ---- registry copy and meta


def test_volume_registry(st: LocalState) -> None:
    assert st.volumes() == {}
    assert st.volume("v") is None
    st.put_volume("v", {"name": "v", "options": {}}, 5)
    st.put_volume("w", {"name": "w"}, 6)
    assert st.volume("v") == {"name": "v", "options": {}}
    assert set(st.volumes()) == {"v", "w"}
    st.replace_volumes({"x": ({"name": "x"}, 7)})
    assert st.volumes() == {"x": {"name": "x"}}
    st.delete_volume("x")
    assert st.volumes() == {}


def test_meta(st: LocalState) -> None:
    assert st.get_meta("k") is None
    assert st.get_meta("k", "dflt") == "dflt"
    st.set_meta("k", "1")
    st.set_meta("k", "2")
    assert st.get_meta("k") == "2"


def test_conflicts_ordered_by_time(st: LocalState) -> None:
    st.add_conflict("v", "b", "b.c", "size", "n1", "n2", 2.0)
    st.add_conflict("v", "a", "a.c", "timestamp", "n2", "n1", 1.0)
    assert [c["path"] for c in st.conflicts("v")] == ["a", "b"]
    assert st.conflicts("v")[0] == {"volume": "v", "path": "a", "copy": "a.c", "mode": "timestamp",
                                    "winner": "n2", "loser": "n1", "at": 1.0}
