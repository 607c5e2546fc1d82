"""Pure decisions about one path: no etcd, no disk, no event loop, so each is tested as a table
(tests/unit/test_decide.py). The stages gather the facts (index record, stat, manifests), ask here
what to do, and do it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ..localfs import FileStat
from ..manifest import Manifest
from ..state import FileRecord

if TYPE_CHECKING:
    from .pending import Pending


def differs(rec: FileRecord, fs: FileStat) -> bool:
    """Has the path changed on disk since the index last agreed with etcd?"""
    if rec.kind != fs.kind:
        return True
    if fs.kind == "dir":
        return (rec.mode, rec.uid, rec.gid) != (fs.mode, fs.uid, fs.gid)
    return (rec.size, rec.mtime_ns, rec.inode, rec.mode, rec.uid, rec.gid) != (
        fs.size, fs.mtime_ns, fs.inode, fs.mode, fs.uid, fs.gid)


def locally_changed(rec: FileRecord | None, fs: FileStat | None) -> bool:
    """Does the disk hold an edit the cluster has not seen (new, changed, or removed)?"""
    if fs is None:
        return rec is not None and rec.kind != "deleted"
    return rec is None or differs(rec, fs)


def depth(rel: str) -> int:
    return rel.count("/")


def apply_order(kind: str, rel: str) -> tuple[bool, int]:
    """Sort key: parents before children, deletions last and deepest first (a rename's source is
    still there when its target is written; a directory is emptied before it is removed)."""
    deleted = kind == "deleted"
    return deleted, -depth(rel) if deleted else depth(rel)


def latest_versions(items: Iterable[Pending]) -> dict[str, Pending]:
    """The newest version of each path in a batch: older ones would only be overwritten."""
    latest: dict[str, Pending] = {}
    for it in items:
        cur = latest.get(it.rel)
        if cur is None or it.rev > cur.rev:
            latest[it.rel] = it
    return latest


def superseded(it: Pending, cur: FileRecord | None) -> bool:
    """Whether a newer version of the path (`cur`, its index record now) was applied while `it` waited
    (fetches run without the volume lock, and deferred items are retried later): the older one must
    then be dropped, neither written over the newer one nor taken for a local edit."""
    if cur is None or cur.rev < it.rev:
        return False
    # The same revision counts only if it was recorded after this item was read (an operator's
    # re-fetch of the current version comes without a record and must go through).
    return cur.rev > it.rev or (it.rec is not None and cur.rev != it.rec.rev)


def known(rec: FileRecord | None, rev: int) -> bool:
    """The index already has this revision of the path (our own publish coming back, or applied)."""
    return rec is not None and rec.rev >= rev


class Remote(StrEnum):
    """What to do with a remote version of a path."""

    SKIP = "skip"  # the index has it already (our own publish coming back, or applied before)
    CONFLICT = "conflict"  # the path has an unpublished local edit: settle it through etcd
    DIR = "dir"  # make the directory / set its attributes
    DELETE = "delete"
    ATTRS = "attrs"  # same content already here: attributes only
    RENAME = "rename"  # try a local rename of the source first (falls back to fetching)
    STREAM = "stream"  # a big file: fetched and written wave by wave
    FETCH = "fetch"  # a small file or symlink: staged with the others of its wave


def plan_remote(m: Manifest, rev: int, rec: FileRecord | None, fs: FileStat | None, stream_threshold: int,
                resolving: bool = False) -> Remote:
    """The action for remote manifest `m` at revision `rev`, given the index record and the disk.
    `resolving`: the conflict path already settled this version; apply it as found."""
    if not resolving:
        if known(rec, rev):
            return Remote.SKIP
        if locally_changed(rec, fs):
            return Remote.CONFLICT
    if m.kind == "dir":
        return Remote.DIR
    if m.kind == "deleted":
        return Remote.DELETE
    if m.kind == "file":
        if (rec is not None and rec.kind == "file" and rec.digest == m.digest and fs is not None
                and not differs(rec, fs)):
            return Remote.ATTRS
        if m.renamed_from:
            return Remote.RENAME
    return transfer(m, stream_threshold)


def transfer(m: Manifest, stream_threshold: int) -> Remote:
    """How a file's content gets here: streamed wave by wave when big, else staged with its wave."""
    return Remote.STREAM if m.kind == "file" and m.size > stream_threshold else Remote.FETCH


class Local(StrEnum):
    """What to publish for a path found dirty on disk."""

    SKIP = "skip"  # unchanged since the index (or our own write coming back through inotify)
    DELETE = "delete"  # gone from disk: a tombstone
    RENAME = "rename"  # a file renamed within the volume: reuse the old description, no re-hash
    DESCRIBE = "describe"  # hash it and publish a new manifest


def plan_local(rec: FileRecord | None, fs: FileStat | None, renamed_from: FileRecord | None,
               inline_max: int) -> Local:
    """`renamed_from`: the index record of a file gone in the same flush with this file's inode, size
    and mtime. Small files are re-described anyway (their bytes travel inline)."""
    if fs is None:
        return Local.DELETE if rec is not None and rec.kind != "deleted" else Local.SKIP
    if rec is not None and not differs(rec, fs):
        return Local.SKIP
    if renamed_from is not None and rec is None and fs.kind == "file" and fs.size > inline_max:
        return Local.RENAME
    return Local.DESCRIBE


def local_wins(mode: str, node_id: str, local: Manifest, remote: Manifest) -> bool:
    """Who keeps the name when two versions of a path were published concurrently."""
    if remote.kind == "deleted":
        return True  # modify beats delete
    if local.kind == "deleted":
        return False
    if mode == "manual":
        return False  # no winner: the version etcd accepted first keeps the name, the other is a copy
    if mode == "size" and local.size != remote.size:
        return local.size > remote.size
    if local.mtime_ns != remote.mtime_ns:
        return local.mtime_ns > remote.mtime_ns
    return node_id > remote.origin


class Winner(StrEnum):
    SAME = "same"  # the same content reached from both sides: adopt the published version
    LOCAL = "local"  # publish ours over theirs
    REMOTE = "remote"  # take theirs


@dataclass(frozen=True, slots=True)
class ConflictPlan:
    winner: Winner
    copy_remote: bool = False  # publish the losing remote version under a conflict name first
    move_local: bool = False  # move our losing content aside under a conflict name


def plan_conflict(mode: str, node_id: str, keep_copies: bool, local: Manifest, remote: Manifest,
                  send_only: bool = False) -> ConflictPlan:
    """How a conflict ends: who wins, and which loser is kept as a conflict copy (no write is lost
    unless the user turned copies off; in `manual` mode ours is always kept). A send-only replica
    never takes a remote version: ours wins, theirs is kept as a copy for the others."""
    if local.content_equal(remote):
        return ConflictPlan(Winner.SAME)
    if send_only:  # even our deletion wins; their content stays as a copy (nothing is lost)
        return ConflictPlan(Winner.LOCAL, copy_remote=keep_copies and remote.kind == "file")
    if local_wins(mode, node_id, local, remote):
        return ConflictPlan(Winner.LOCAL, copy_remote=keep_copies and remote.kind == "file" and local.kind != "deleted")
    return ConflictPlan(Winner.REMOTE, move_local=local.kind == "file" and (keep_copies or mode == "manual"))
