"""Pure decisions about one path: no etcd, no disk, no event loop, so each is tested as a table."""

from __future__ import annotations

from ..localfs import FileStat
from ..state import FileRecord


def differs(rec: FileRecord, fs: FileStat) -> bool:
    """Has the path changed on disk since the index last agreed with etcd?"""
    if rec.kind != fs.kind:
        return True
    if fs.kind == "dir":
        return (rec.mode, rec.uid, rec.gid) != (fs.mode, fs.uid, fs.gid)
    return (rec.size, rec.mtime_ns, rec.inode, rec.mode, rec.uid, rec.gid) != (
        fs.size, fs.mtime_ns, fs.inode, fs.mode, fs.uid, fs.gid)
