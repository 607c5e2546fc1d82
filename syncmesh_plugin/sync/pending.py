"""A remote change on its way through the stages, and the index record it becomes."""

from __future__ import annotations

from dataclasses import dataclass

from ..localfs import FileStat
from ..manifest import Manifest
from ..state import FileRecord
from .decide import Remote


@dataclass
class Pending:
    """A remote change waiting to be applied."""

    rel: str
    m: Manifest
    rev: int
    rec: FileRecord | None = None
    fs: FileStat | None = None
    action: Remote | None = None  # what the apply stage planned for it (decide.plan_remote)


def record_of(volume: str, rel: str, m: Manifest, fs: FileStat | None, rev: int) -> FileRecord:
    return FileRecord(
        volume=volume, path=rel, kind=m.kind, size=m.size, mtime_ns=fs.mtime_ns if fs else m.mtime_ns,
        ctime_ns=fs.ctime_ns if fs else 0, inode=fs.inode if fs else 0, mode=m.mode, uid=m.uid, gid=m.gid,
        digest=m.digest, chunks=m.chunks, target=m.target, rev=rev, origin=m.origin)
