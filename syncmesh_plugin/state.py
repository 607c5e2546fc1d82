"""Local persistent state (SQLite under <data_root>/state): what survives a daemon restart.

- the registry copy: every cluster volume, so Docker's Get/List answer while etcd is unreachable
- mount reference counts per mount ID (dockerd never replays Mount after a plugin restart)
- held volumes and the etcd revision each one has applied (watches resume from there)
- the file index: last synced state of every path, and which local file holds which chunk
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .sync.versions import Version

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY, record TEXT NOT NULL, mod_revision INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mounts (
    volume TEXT NOT NULL, mount_id TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (volume, mount_id));
CREATE TABLE IF NOT EXISTS held (volume TEXT PRIMARY KEY, revision INTEGER NOT NULL DEFAULT 0,
    synced INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files (
    volume TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, mtime_ns INTEGER NOT NULL DEFAULT 0, ctime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0, mode INTEGER NOT NULL DEFAULT 0, uid INTEGER NOT NULL DEFAULT 0,
    gid INTEGER NOT NULL DEFAULT 0, digest TEXT NOT NULL DEFAULT '', chunks TEXT NOT NULL DEFAULT '[]',
    target TEXT NOT NULL DEFAULT '', rev INTEGER NOT NULL DEFAULT 0, origin TEXT NOT NULL DEFAULT '',
    published INTEGER NOT NULL DEFAULT 1, parent TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (volume, path));
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT NOT NULL, volume TEXT NOT NULL, path TEXT NOT NULL, off INTEGER NOT NULL,
    length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_id ON chunks (chunk_id);
CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks (volume, path);
CREATE TABLE IF NOT EXISTS versions (
    volume TEXT NOT NULL, id TEXT NOT NULL, path TEXT NOT NULL, at REAL NOT NULL, size INTEGER NOT NULL,
    digest TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT 'replaced', origin TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (volume, id));
CREATE INDEX IF NOT EXISTS versions_by_path ON versions (volume, path, at);
CREATE TABLE IF NOT EXISTS conflicts (
    volume TEXT NOT NULL, path TEXT NOT NULL, copy TEXT NOT NULL, mode TEXT NOT NULL,
    winner TEXT NOT NULL, loser TEXT NOT NULL, at REAL NOT NULL);
"""


BLOB_PREFIX = "\x00blob/"  # chunk locations inside a chunk-list blob, not a file of the volume


@dataclass(slots=True)
class FileRecord:
    """The last state of a path that this node and etcd agreed on."""

    volume: str
    path: str
    kind: str  # file | dir | symlink | deleted
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    digest: str = ""
    chunks: list[list[Any]] | None = None  # [[id, length], ...]
    target: str = ""
    rev: int = 0  # etcd mod_revision of the manifest this record corresponds to
    origin: str = ""
    published: bool = True  # False: a local change not yet accepted by etcd (etcd was down)


_FILE_COLS = ("volume", "path", "kind", "size", "mtime_ns", "ctime_ns", "inode", "mode", "uid", "gid",
              "digest", "chunks", "target", "rev", "origin", "published", "parent")


def _select_paths(db: sqlite3.Connection, columns: str, volume: str, paths: Sequence[str],
                  where: str = "") -> Iterator[Any]:
    """Rows of the given paths, queried 500 at a time (SQLite bounds the parameters of one query)."""
    for i in range(0, len(paths), 500):
        part = paths[i:i + 500]
        yield from db.execute(f"SELECT {columns} FROM files WHERE volume=? AND path IN "
                              f"({','.join('?' * len(part))}){where}", (volume, *part))


def _row_to_file(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        volume=row["volume"], path=row["path"], kind=row["kind"], size=row["size"], mtime_ns=row["mtime_ns"],
        ctime_ns=row["ctime_ns"], inode=row["inode"], mode=row["mode"], uid=row["uid"], gid=row["gid"],
        digest=row["digest"], chunks=json.loads(row["chunks"]), target=row["target"], rev=row["rev"],
        origin=row["origin"], published=bool(row["published"]))


class LocalState:
    """One SQLite database; every method is short and runs on the event loop thread."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "syncmesh.db")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(files)")}
        if "parent" not in cols:  # index written by 0.1.0 before per-directory rescans
            self.db.execute("ALTER TABLE files ADD COLUMN parent TEXT NOT NULL DEFAULT ''")
            self.db.execute("UPDATE files SET parent = CASE WHEN instr(path, '/') = 0 THEN '' ELSE "
                            "substr(path, 1, length(rtrim(path, replace(path, '/', ''))) - 1) END")
        self.db.execute("CREATE INDEX IF NOT EXISTS files_by_parent ON files (volume, parent)")

    def close(self) -> None:
        self.db.close()

    # ---- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row["value"] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ---- registry copy
    def volumes(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: json.loads(r["record"]) for r in self.db.execute("SELECT name, record FROM volumes")}

    def volume(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT record FROM volumes WHERE name=?", (name,)).fetchone()
        return json.loads(row["record"]) if row else None

    def put_volume(self, name: str, record: dict[str, Any], mod_revision: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO volumes (name, record, mod_revision) VALUES (?, ?, ?)",
                        (name, json.dumps(record, sort_keys=True), mod_revision))

    def replace_volumes(self, records: dict[str, tuple[dict[str, Any], int]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM volumes")
            self.db.executemany("INSERT INTO volumes (name, record, mod_revision) VALUES (?, ?, ?)",
                                [(n, json.dumps(r, sort_keys=True), rev) for n, (r, rev) in records.items()])

    def delete_volume(self, name: str) -> None:
        self.db.execute("DELETE FROM volumes WHERE name=?", (name,))

    # ---- mounts
    def mounts(self, volume: str) -> dict[str, int]:
        return {r["mount_id"]: r["count"] for r in
                self.db.execute("SELECT mount_id, count FROM mounts WHERE volume=?", (volume,))}

    def all_mounts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.db.execute("SELECT volume, mount_id, count FROM mounts"):
            out.setdefault(r["volume"], {})[r["mount_id"]] = r["count"]
        return out

    def add_mount(self, volume: str, mount_id: str) -> int:
        self.db.execute("INSERT INTO mounts (volume, mount_id, count) VALUES (?, ?, 1) "
                        "ON CONFLICT (volume, mount_id) DO UPDATE SET count = count + 1", (volume, mount_id))
        return sum(self.mounts(volume).values())

    def remove_mount(self, volume: str, mount_id: str) -> int:
        self.db.execute("UPDATE mounts SET count = count - 1 WHERE volume=? AND mount_id=?", (volume, mount_id))
        self.db.execute("DELETE FROM mounts WHERE count <= 0")
        return sum(self.mounts(volume).values())

    def clear_mounts(self, volume: str) -> None:
        self.db.execute("DELETE FROM mounts WHERE volume=?", (volume,))

    # ---- held volumes
    def held(self) -> dict[str, int]:
        return {r["volume"]: r["revision"] for r in self.db.execute("SELECT volume, revision FROM held")}

    def hold(self, volume: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO held (volume, revision) VALUES (?, 0)", (volume,))

    def is_synced(self, volume: str) -> bool:
        row = self.db.execute("SELECT synced FROM held WHERE volume=?", (volume,)).fetchone()
        return bool(row and row["synced"])

    def set_synced(self, volume: str, synced: bool = True) -> None:
        self.db.execute("UPDATE held SET synced=? WHERE volume=?", (1 if synced else 0, volume))

    def revision(self, volume: str) -> int:
        row = self.db.execute("SELECT revision FROM held WHERE volume=?", (volume,)).fetchone()
        return int(row["revision"]) if row else 0

    def set_revision(self, volume: str, revision: int) -> None:
        self.db.execute("UPDATE held SET revision=? WHERE volume=? AND revision < ?", (revision, volume, revision))

    def unhold(self, volume: str) -> None:
        """Forget everything this node knew of the volume: a volume created again under the same name
        starts from nothing (its first Mount waits for a whole copy again)."""
        with self.db:
            self.db.execute("BEGIN")
            for table in ("held", "files", "chunks", "mounts", "conflicts", "versions"):
                self.db.execute(f"DELETE FROM {table} WHERE volume=?", (volume,))
            self.db.executemany("DELETE FROM meta WHERE key=?",
                                [(f"{k}:{volume}",) for k in ("complete", "held_since", "role", "root")])

    # ---- file index
    def file(self, volume: str, path: str) -> FileRecord | None:
        row = self.db.execute("SELECT * FROM files WHERE volume=? AND path=?", (volume, path)).fetchone()
        return _row_to_file(row) if row else None

    def files(self, volume: str, prefix: str = "") -> Iterator[FileRecord]:
        if prefix:
            cur = self.db.execute("SELECT * FROM files WHERE volume=? AND (path=? OR substr(path, 1, ?)=?) "
                                  "ORDER BY path", (volume, prefix, len(prefix) + 1, prefix + "/"))
        else:
            cur = self.db.execute("SELECT * FROM files WHERE volume=? ORDER BY path", (volume,))
        for row in cur:
            yield _row_to_file(row)

    def files_for(self, volume: str, paths: Iterable[str]) -> dict[str, FileRecord]:
        """Index records of many paths in a few queries (a burst of thousands of files)."""
        return {row["path"]: _row_to_file(row) for row in _select_paths(self.db, "*", volume, list(paths))}

    def revisions_for(self, volume: str, paths: Iterable[str]) -> dict[str, int]:
        """The indexed revision of many paths (absent: not indexed); cheaper than `files_for`."""
        return {row[0]: row[1] for row in _select_paths(self.db, "path, rev", volume, list(paths))}

    def files_page(self, volume: str, prefix: str = "", after: str = "", limit: int = 100,
                   deleted: bool = False) -> list[FileRecord]:
        """One page of the index in path order: paths starting with `prefix` (a plain string prefix),
        after `after` (the previous page's last path), at most `limit`; tombstones only if `deleted`."""
        q = "SELECT * FROM files WHERE volume=? AND path > ?"
        args: list[Any] = [volume, after]
        if prefix:
            q += " AND substr(path, 1, ?) = ?"
            args += [len(prefix), prefix]
        if not deleted:
            q += " AND kind != 'deleted'"
        q += " ORDER BY path LIMIT ?"
        args.append(limit)
        return [_row_to_file(r) for r in self.db.execute(q, args)]

    def reader(self) -> sqlite3.Connection:
        """A separate read-only connection for a worker thread (WAL lets it read while we write)."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        db.execute("PRAGMA query_only=1")
        return db

    @staticmethod
    def stats_for(db: sqlite3.Connection, volume: str, paths: Sequence[str]
                  ) -> dict[str, tuple[str, int, int, int, int, int, int]]:
        """path -> (kind, size, mtime_ns, inode, mode, uid, gid) of those of `paths` indexed live: a rescan
        compares the disk with the index a few hundred entries at a time."""
        return {r[0]: tuple(r[1:]) for r in _select_paths(db, "path, kind, size, mtime_ns, inode, mode, uid, gid",
                                                          volume, paths, " AND kind != 'deleted'")}

    @staticmethod
    def children(db: sqlite3.Connection, volume: str, parent: str) -> Iterator[str]:
        """Paths of the live index entries of one directory, read as they are iterated."""
        for (path,) in db.execute("SELECT path FROM files WHERE volume=? AND parent=? AND kind != 'deleted'",
                                  (volume, parent)):
            yield path

    def begin_seen(self) -> None:
        """A scratch table of the paths a full reconcile read from etcd (kept on disk, not in memory)."""
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (path TEXT PRIMARY KEY)")
        self.db.execute("DELETE FROM seen")

    def add_seen(self, paths: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO seen (path) VALUES (?)", ((p,) for p in paths))

    def unseen_files(self, volume: str, batch: int = 1000) -> Iterator[list[FileRecord]]:
        """Live index entries that the reconcile did not see in etcd, in batches."""
        last = ""
        while True:
            rows = self.db.execute(
                "SELECT * FROM files WHERE volume=? AND kind != 'deleted' AND path > ? "
                "AND path NOT IN (SELECT path FROM seen) ORDER BY path LIMIT ?", (volume, last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1]["path"]
            yield [_row_to_file(r) for r in rows]

    def put_files(self, records: Iterable[FileRecord]) -> None:
        """Record files (and their chunk locations) in one transaction."""
        rows = []
        chunk_rows = []
        paths = []
        for r in records:
            rows.append((r.volume, r.path, r.kind, r.size, r.mtime_ns, r.ctime_ns, r.inode, r.mode, r.uid, r.gid,
                         r.digest, json.dumps(r.chunks or []), r.target, r.rev, r.origin, 1 if r.published else 0,
                         r.path.rpartition("/")[0]))
            paths.append((r.volume, r.path))
            off = 0
            for cid, length in (r.chunks or []) if r.kind == "file" else []:
                chunk_rows.append((cid, r.volume, r.path, off, length))
                off += length
        if not rows:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM chunks WHERE volume=? AND path=?", paths)
            self.db.executemany(f"INSERT OR REPLACE INTO files ({', '.join(_FILE_COLS)}) "
                                f"VALUES ({', '.join('?' * len(_FILE_COLS))})", rows)
            self.db.executemany("INSERT INTO chunks (chunk_id, volume, path, off, length) VALUES (?, ?, ?, ?, ?)",
                                chunk_rows)

    def put_blob(self, volume: str, blob_id: str, chunks: list[list[Any]]) -> None:
        """Register the chunks of a chunk-list blob, so this node can serve it to peers."""
        path = BLOB_PREFIX + blob_id
        rows = []
        off = 0
        for cid, length in chunks:
            rows.append((cid, volume, path, off, length))
            off += length
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM chunks WHERE volume=? AND path=?", (volume, path))
            self.db.executemany("INSERT INTO chunks (chunk_id, volume, path, off, length) VALUES (?, ?, ?, ?, ?)",
                                rows)

    def delete_files(self, volume: str, paths: Iterable[str]) -> None:
        items = [(volume, p) for p in paths]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM files WHERE volume=? AND path=?", items)
            self.db.executemany("DELETE FROM chunks WHERE volume=? AND path=?", items)

    def chunk_locations(self, chunk_id: str, limit: int = 8) -> list[tuple[str, str, int, int]]:
        """(volume, path, offset, length) of local files that held this chunk when last indexed."""
        return [(r[0], r[1], r[2], r[3]) for r in self.db.execute(
            "SELECT volume, path, off, length FROM chunks WHERE chunk_id=? LIMIT ?", (chunk_id, limit))]

    def volume_stats(self, volume: str) -> dict[str, int]:
        row = self.db.execute("SELECT count(*), coalesce(sum(size), 0), coalesce(sum(published = 0), 0) FROM files "
                              "WHERE volume=? AND kind != 'deleted'", (volume,)).fetchone()
        return {"files": int(row[0]), "bytes": int(row[1]), "unpublished": int(row[2])}

    # ---- versions kept for undo (sync/versions.py)
    def add_versions(self, volume: str, versions: Iterable[Version]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO versions (volume, id, path, at, size, digest, reason, origin) "
                            "VALUES (?,?,?,?,?,?,?,?)",
                            [(volume, v.id, v.path, v.at, v.size, v.digest, v.reason, v.origin) for v in versions])

    def versions(self, volume: str, prefix: str = "") -> list[Version]:
        """This node's kept versions of the volume (of `prefix`: that path and everything below it)."""
        if prefix:
            like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
            rows = self.db.execute("SELECT id, path, at, size, digest, reason, origin FROM versions WHERE volume=? "
                                   "AND (path=? OR path LIKE ? ESCAPE '\\') ORDER BY at", (volume, prefix, like))
        else:
            rows = self.db.execute("SELECT id, path, at, size, digest, reason, origin FROM versions WHERE volume=? "
                                   "ORDER BY at", (volume,))
        return [Version(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def delete_versions(self, volume: str, ids: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM versions WHERE volume=? AND id=?", [(volume, i) for i in ids])

    def version_stats(self, volume: str) -> tuple[int, int]:
        row = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM versions WHERE volume=?",
                              (volume,)).fetchone()
        return int(row[0]), int(row[1])

    # ---- conflicts
    def add_conflict(self, volume: str, path: str, copy: str, mode: str, winner: str, loser: str, at: float) -> None:
        self.db.execute("INSERT INTO conflicts (volume, path, copy, mode, winner, loser, at) VALUES (?,?,?,?,?,?,?)",
                        (volume, path, copy, mode, winner, loser, at))

    def prune_conflicts(self, before: float) -> int:
        """Forget conflict records older than the retention (the copies themselves stay on disk)."""
        return self.db.execute("DELETE FROM conflicts WHERE at < ?", (before,)).rowcount

    def conflicts(self, volume: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM conflicts WHERE volume=? ORDER BY at", (volume,))]
