"""The engine's pure decisions, as tables: no etcd, no disk, no event loop."""

from __future__ import annotations

import pytest

from syncmesh_plugin.localfs import FileStat
from syncmesh_plugin.manifest import Manifest
from syncmesh_plugin.state import FileRecord
from syncmesh_plugin.sync.decide import (
    Local,
    Remote,
    Winner,
    apply_order,
    differs,
    latest_versions,
    local_wins,
    locally_changed,
    plan_conflict,
    plan_local,
    plan_remote,
    superseded,
    transfer,
)
from syncmesh_plugin.sync.pending import Pending

BIG = 16 * 1024 * 1024
INLINE = 4096


def rec(kind: str = "file", rev: int = 5, size: int = 10, mtime: int = 100, inode: int = 7, mode: int = 0o644,
        uid: int = 0, gid: int = 0, digest: str = "d1") -> FileRecord:
    return FileRecord(volume="v", path="p", kind=kind, size=size, mtime_ns=mtime, inode=inode, mode=mode, uid=uid,
                      gid=gid, digest=digest, rev=rev)


def st(kind: str = "file", size: int = 10, mtime: int = 100, inode: int = 7, mode: int = 0o644, uid: int = 0,
       gid: int = 0) -> FileStat:
    return FileStat(kind=kind, size=size, mtime_ns=mtime, ctime_ns=0, inode=inode, mode=mode, uid=uid, gid=gid)


def man(kind: str = "file", size: int = 10, digest: str = "d2", mtime: int = 200, origin: str = "n2",
        renamed_from: str = "", mode: int = 0o644) -> Manifest:
    return Manifest(kind=kind, size=size, digest=digest if kind == "file" else "", mtime_ns=mtime, origin=origin,
                    renamed_from=renamed_from, mode=mode)


# ---- does the disk differ from the index
@pytest.mark.parametrize(("r", "fs", "expected"), [
    (rec(), st(), False),
    (rec(), st(size=11), True),
    (rec(), st(mtime=101), True),
    (rec(), st(inode=8), True),  # replaced by a rename over it
    (rec(), st(mode=0o600), True),
    (rec(), st(uid=1000), True),
    (rec(), st(gid=1000), True),
    (rec(), st(kind="dir"), True),
    (rec(kind="symlink"), st(kind="symlink"), False),
    (rec(kind="symlink"), st(kind="symlink", mtime=5), True),
    (rec(kind="dir", size=4096, mtime=1), st(kind="dir", size=8192, mtime=9, inode=99), False),  # dirs: attrs only
    (rec(kind="dir"), st(kind="dir", mode=0o700), True),
    (rec(kind="dir"), st(kind="dir", uid=5), True),
    (rec(kind="deleted"), st(), True),  # written again after a deletion was recorded
])
def test_differs(r: FileRecord, fs: FileStat, expected: bool) -> None:
    assert differs(r, fs) is expected


@pytest.mark.parametrize(("r", "fs", "expected"), [
    (None, None, False),  # never known, not there
    (None, st(), True),  # new on disk
    (rec(), None, True),  # removed locally, not published
    (rec(kind="deleted"), None, False),  # the deletion is known
    (rec(), st(), False),
    (rec(), st(size=1), True),
])
def test_locally_changed(r: FileRecord | None, fs: FileStat | None, expected: bool) -> None:
    assert locally_changed(r, fs) is expected


# ---- what to do with a remote version
@pytest.mark.parametrize(("m", "rev", "r", "fs", "resolving", "expected"), [
    # the index has it already: our own publish coming back through the watch, or applied before
    (man(), 5, rec(rev=5), st(), False, Remote.SKIP),
    (man(), 4, rec(rev=5), st(), False, Remote.SKIP),  # a stale version after a newer one
    (man(), 4, rec(rev=5), st(size=1), False, Remote.SKIP),  # even with a local edit: the newer wins later
    # unpublished local edits meet a remote version: settled through etcd
    (man(), 6, rec(rev=5), st(size=99), False, Remote.CONFLICT),  # write racing an incoming version
    (man(), 6, None, st(), False, Remote.CONFLICT),  # created on both sides
    (man(kind="deleted"), 6, rec(rev=5), st(size=99), False, Remote.CONFLICT),  # modify vs delete
    (man(), 6, rec(rev=5), None, False, Remote.CONFLICT),  # delete vs modify
    (man(kind="dir"), 6, None, st(kind="dir"), False, Remote.CONFLICT),  # a local dir not yet published
    # clean paths: the action by kind
    (man(kind="dir"), 6, None, None, False, Remote.DIR),
    (man(kind="dir"), 6, rec(kind="dir", rev=5), st(kind="dir"), False, Remote.DIR),
    (man(kind="deleted"), 6, rec(rev=5), st(), False, Remote.DELETE),
    (man(kind="deleted"), 6, None, None, False, Remote.DELETE),  # a tombstone for a path never seen
    (man(kind="symlink"), 6, None, None, False, Remote.FETCH),
    (man(), 6, None, None, False, Remote.FETCH),  # a new small file
    (man(size=BIG + 1), 6, None, None, False, Remote.STREAM),
    (man(size=BIG), 6, None, None, False, Remote.FETCH),  # at the threshold: still staged with its wave
    (man(digest="d1", mode=0o600), 6, rec(rev=5), st(), False, Remote.ATTRS),  # same content, new mode
    (man(digest="d1"), 6, rec(rev=5, kind="symlink"), st(kind="symlink"), False, Remote.FETCH),
    (man(digest="d1"), 6, rec(rev=5, kind="deleted"), None, False, Remote.FETCH),  # content came back
    (man(renamed_from="old"), 6, None, None, False, Remote.RENAME),
    (man(renamed_from="old", digest="d1"), 6, rec(rev=5), st(), False, Remote.ATTRS),  # already here
    # resolving: the conflict path settled this version; apply it as found, never skip or re-conflict
    (man(), 5, rec(rev=5), st(size=99), True, Remote.FETCH),
    (man(kind="deleted"), 6, rec(rev=5), st(size=99), True, Remote.DELETE),
    (man(size=BIG + 1), 6, None, st(), True, Remote.STREAM),
])
def test_plan_remote(m: Manifest, rev: int, r: FileRecord | None, fs: FileStat | None, resolving: bool,
                     expected: Remote) -> None:
    assert plan_remote(m, rev, r, fs, BIG, resolving) is expected


@pytest.mark.parametrize(("m", "expected"), [
    (man(size=BIG + 1), Remote.STREAM), (man(size=10), Remote.FETCH), (man(kind="symlink"), Remote.FETCH),
    (man(size=BIG + 1, renamed_from="x"), Remote.STREAM),  # the fallback when a local rename is not possible
])
def test_transfer(m: Manifest, expected: Remote) -> None:
    assert transfer(m, BIG) is expected


# ---- superseded versions and apply order
def pend(rel: str, rev: int, r: FileRecord | None = None) -> Pending:
    return Pending(rel, man(), rev, rec=r)


@pytest.mark.parametrize(("it", "cur", "expected"), [
    (pend("a", 5), None, False),  # nothing applied meanwhile
    (pend("a", 5), rec(rev=4), False),  # older in the index: go ahead
    (pend("a", 5), rec(rev=6), True),  # a newer version was applied while this one waited
    (pend("a", 5, rec(rev=3)), rec(rev=5), True),  # this very revision was applied by someone else meanwhile
    (pend("a", 5, rec(rev=5)), rec(rev=5), False),  # an operator's re-fetch of the current version
    (pend("a", 5), rec(rev=5), False),  # read without a record: goes through
])
def test_superseded(it: Pending, cur: FileRecord | None, expected: bool) -> None:
    assert superseded(it, cur) is expected


def test_latest_versions_keep_the_newest_of_each_path() -> None:
    items = [pend("a", 3), pend("b", 9), pend("a", 7), pend("a", 5), pend("c", 1), pend("b", 2)]
    got = latest_versions(items)
    assert {k: v.rev for k, v in got.items()} == {"a": 7, "b": 9, "c": 1}


def test_apply_order_parents_first_deletions_last_deepest_first() -> None:
    items = [("deleted", "a"), ("file", "a/b/c"), ("deleted", "a/b"), ("dir", "a"), ("dir", "a/b"),
             ("deleted", "a/b/c"), ("file", "z"), ("symlink", "a/l")]
    got = sorted(items, key=lambda t: apply_order(*t))
    assert got == [("dir", "a"), ("file", "z"), ("dir", "a/b"), ("symlink", "a/l"), ("file", "a/b/c"),
                   ("deleted", "a/b/c"), ("deleted", "a/b"), ("deleted", "a")]


# ---- what to publish for a dirty path
@pytest.mark.parametrize(("r", "fs", "src", "expected"), [
    (None, None, None, Local.SKIP),  # created and removed between two looks
    (rec(kind="deleted"), None, None, Local.SKIP),  # the deletion is published already
    (rec(), None, None, Local.DELETE),
    (rec(kind="dir"), None, None, Local.DELETE),
    (rec(), st(), None, Local.SKIP),  # our own write coming back through inotify
    (rec(), st(size=11), None, Local.DESCRIBE),
    (None, st(), None, Local.DESCRIBE),
    (None, st(size=INLINE + 1), rec(size=INLINE + 1), Local.RENAME),  # renamed within the volume
    (None, st(size=INLINE), rec(size=INLINE), Local.DESCRIBE),  # small files travel inline anyway
    (rec(), st(size=INLINE + 1), rec(size=INLINE + 1), Local.DESCRIBE),  # renamed over an existing file
    (None, st(kind="dir", size=INLINE + 1), rec(kind="dir", size=INLINE + 1), Local.DESCRIBE),
    (rec(kind="deleted"), st(), None, Local.DESCRIBE),  # written again after a deletion
])
def test_plan_local(r: FileRecord | None, fs: FileStat | None, src: FileRecord | None, expected: Local) -> None:
    assert plan_local(r, fs, src, INLINE) is expected


# ---- who wins a conflict, and what is kept
@pytest.mark.parametrize(("mode", "node", "local", "remote", "expected"), [
    ("timestamp", "n1", man(mtime=300), man(mtime=200), True),
    ("timestamp", "n1", man(mtime=100), man(mtime=200), False),
    ("timestamp", "n1", man(mtime=200), man(mtime=200, origin="n2"), False),  # tie: the larger node id
    ("timestamp", "n3", man(mtime=200), man(mtime=200, origin="n2"), True),
    ("timestamp", "n1", man(), man(kind="deleted"), True),  # modify beats delete
    ("timestamp", "n1", man(kind="deleted"), man(), False),  # delete loses to modify
    ("size", "n1", man(size=10, mtime=900), man(size=20, mtime=1), False),
    ("size", "n1", man(size=30, mtime=1), man(size=20, mtime=900), True),
    ("size", "n1", man(size=20, mtime=900), man(size=20, mtime=1), True),  # same size: by time
    ("manual", "n9", man(mtime=999), man(mtime=1), False),  # etcd's first keeps the name
    ("manual", "n1", man(), man(kind="deleted"), True),  # modify beats delete in every mode
])
def test_local_wins(mode: str, node: str, local: Manifest, remote: Manifest, expected: bool) -> None:
    assert local_wins(mode, node, local, remote) is expected


# Copies off: the loser is replaced, except in manual mode, which always keeps ours.
@pytest.mark.parametrize(("mode", "keep", "local", "remote", "winner", "copy_remote", "move_local"), [
    ("timestamp", True, man(digest="x"), man(digest="x", mtime=5), Winner.SAME, False, False),
    ("timestamp", True, man(kind="deleted"), man(kind="deleted"), Winner.SAME, False, False),
    ("timestamp", True, man(mtime=300, digest="a"), man(mtime=200, digest="b"), Winner.LOCAL, True, False),
    ("timestamp", False, man(mtime=300, digest="a"), man(mtime=200, digest="b"), Winner.LOCAL, False, False),
    ("timestamp", True, man(), man(kind="deleted"), Winner.LOCAL, False, False),  # nothing to keep of a deletion
    ("timestamp", True, man(mtime=300), man(kind="symlink", mtime=200), Winner.LOCAL, False, False),
    ("timestamp", True, man(mtime=100, digest="a"), man(mtime=200, digest="b"), Winner.REMOTE, False, True),
    ("timestamp", False, man(mtime=100, digest="a"), man(mtime=200, digest="b"), Winner.REMOTE, False, False),
    ("manual", False, man(mtime=900, digest="a"), man(mtime=1, digest="b"), Winner.REMOTE, False, True),
    ("timestamp", True, man(kind="deleted"), man(), Winner.REMOTE, False, False),  # our delete: nothing to move
    ("timestamp", True, man(kind="symlink", mtime=1), man(mtime=9), Winner.REMOTE, False, False),
    ("size", True, man(size=1), man(size=2), Winner.REMOTE, False, True),
])
def test_plan_conflict(mode: str, keep: bool, local: Manifest, remote: Manifest, winner: Winner, copy_remote: bool,
                       move_local: bool) -> None:
    plan = plan_conflict(mode, "n1", keep, local, remote)
    assert (plan.winner, plan.copy_remote, plan.move_local) == (winner, copy_remote, move_local)


@pytest.mark.parametrize(("local", "remote", "winner", "copy_remote"), [
    (man(mtime=1, digest="a"), man(mtime=9, digest="b"), Winner.LOCAL, True),  # older, still ours
    (man(kind="deleted"), man(mtime=9), Winner.LOCAL, True),  # even our deletion; their file kept as a copy
    (man(digest="x"), man(digest="x"), Winner.SAME, False),
])
def test_a_send_only_replica_never_takes_a_remote_version(local: Manifest, remote: Manifest, winner: Winner,
                                                           copy_remote: bool) -> None:
    plan = plan_conflict("timestamp", "n1", True, local, remote, send_only=True)
    assert (plan.winner, plan.copy_remote, plan.move_local) == (winner, copy_remote, False)
