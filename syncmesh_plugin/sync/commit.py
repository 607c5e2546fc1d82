"""Stage and commit: write temp files, flush, and rename them into place unless the target changed meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import chunker, localfs, metrics
from ..localfs import FileStat
from ..manifest import Manifest
from ..pathsafe import PathError, conflict_name
from ..state import BLOB_PREFIX, FileRecord
from .decide import superseded
from .fetch import FetchError
from .pending import Pending, record_of
from .stage import Stage
from .versions import Version

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

LARGE_WAVE_BYTES = 6 * 1024 * 1024  # per wave of a streamed big file (two waves in flight: the peak RSS)


def with_offsets(chunks: list[list[Any]]) -> list[tuple[str, int, int]]:
    out = []
    off = 0
    for cid, ln in chunks:
        out.append((cid, off, ln))
        off += ln
    return out


def wave_groups(chunks: list[tuple[str, int, int]], limit: int) -> Iterator[list[tuple[str, int, int]]]:
    """Consecutive groups of (id, offset, length) of about `limit` bytes."""
    group: list[tuple[str, int, int]] = []
    size = 0
    for entry in chunks:
        group.append(entry)
        size += entry[2]
        if size >= limit:
            yield group
            group, size = [], 0
    if group:
        yield group


class PartialFile:
    """The temp file of a big file being applied, shared read-only with peers until it is committed.

    Its descriptor is closed only when no read is in flight, so a worker thread never preads a closed
    (or reused) descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.readers = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def read(self, off: int, ln: int) -> bytes | None:
        if self.closing:
            return None
        self.readers += 1
        self._idle.clear()
        try:
            data = await asyncio.to_thread(os.pread, self.fd, ln, off)
            return data if len(data) == ln else None
        except OSError:
            return None
        finally:
            self.readers -= 1
            if self.readers == 0:
                self._idle.set()

    async def close(self) -> None:
        self.closing = True
        await self._idle.wait()
        os.close(self.fd)


class CopySources(dict[tuple[str, int], list[tuple[str, int]]]):
    """(chunk id, length) -> [(path, offset)] in local files of the volume, with `stat`: path ->
    (size, mtime_ns, ctime_ns, inode) as indexed (the file must still be that one when copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.stat: dict[str, tuple[int, int, int, int]] = {}


class Committer(Stage):
    """Writes staged temp files and renames them into place unless the target changed meanwhile."""

    async def apply_wave(self, wave: list[Pending]) -> None:
        origins = [it.m.origin for it in wave if it.m.inline is None and it.m.kind == "file"]
        lacking: set[str] = set()
        got, _ = await self.vol.fetcher.gather(wave, origins[0] if origins else "", lacking)
        if lacking:
            # One round of fetches per wave: files whose chunks no peer could serve wait (deferred),
            # everything else in the wave (inline files, chunks found) is applied now.
            exc = FetchError(f"{len(lacking)} chunk(s) of volume {self.name} not available from any peer")
            ready = []
            for it in wave:
                if it.m.kind == "file" and it.m.inline is None and any(c in lacking for c, _ in it.m.chunks):
                    self.vol.applier.defer(it, exc)
                else:
                    ready.append(it)
            wave = ready

        def write() -> list[tuple[Pending, int, str]]:
            staged = []
            for it in wave:
                try:
                    dfd, tmp = localfs.stage(self.root, it.rel, it.m, lambda cid, ln: got[cid])
                except (OSError, PathError) as exc:
                    self.vol.applier.reject(it, exc)
                    continue
                staged.append((it, dfd, tmp))
            if staged:
                localfs.syncfs(self.root)
            return staged

        staged = await asyncio.to_thread(write)
        await self.commit(staged)

    async def commit(self, staged: list[tuple[Pending, int, str]]) -> None:
        """Move staged files into place unless the target changed locally meanwhile (the fetch ran
        without the lock): those go through the conflict path. The check happens in `localfs.commit`,
        right before each rename, so a write racing with the swap is not lost (see there)."""
        ready = []
        now = self.state.files_for(self.name, [it.rel for it, _, _ in staged])  # one query per wave
        for it, dfd, tmp in staged:
            if superseded(it, now.get(it.rel)):
                await asyncio.to_thread(localfs.discard, dfd, tmp)
            else:
                ready.append((it, dfd, tmp))
        raced: list[tuple[Pending, FileStat | None]] = []
        displaced: list[tuple[Pending, int]] = []

        kept: list[Version] = []
        renamed: list[str] = []

        def rename_all() -> list[FileRecord]:
            recs = []
            for it, dfd, tmp in ready:
                # With versioning on, the file being replaced is kept (hard-linked) in the version store.
                replaces_file = it.fs is not None and it.fs.kind == "file"
                vid, keep_as = self.vol.keeper.version_slot() if replaces_file else ("", "")
                try:
                    fs, old_fd = localfs.commit(dfd, tmp, it.rel, it.fs, keep_as)
                except localfs.TargetChanged as exc:
                    raced.append((it, exc.now))
                    continue
                except OSError as exc:
                    if keep_as:
                        with contextlib.suppress(OSError):
                            os.unlink(keep_as)
                    self.vol.applier.reject(it, exc)
                    continue
                if keep_as and it.fs is not None and os.path.lexists(keep_as):
                    kept.append(Version(vid, it.rel, time.time(), it.fs.size, it.rec.digest if it.rec else "",
                                        "replaced", it.m.origin))
                renamed.append(it.rel)
                if old_fd >= 0:
                    displaced.append((it, old_fd))
                it.rec = record_of(self.name, it.rel, it.m, fs, it.rev)
                recs.append(it.rec)
            return recs

        try:
            self.state.put_files(await asyncio.to_thread(rename_all))
        except Exception:
            # Renamed into place but not recorded: the watcher does not report the daemon's own renames
            # (see watcher._moved), so the publisher is told to look at them again, as a local change.
            self.vol.dirty.update(renamed)
            self.vol.kick.set()
            raise
        if kept:
            self.vol.keeper.versions_kept(kept)
        for it, old_fd in displaced:
            self.keep_displaced(it, old_fd)
        for it, seen in raced:
            it.fs = seen
            await self.vol.conflicts.local_vs_remote(it)

    def keep_displaced(self, it: Pending, fd: int) -> None:
        """A local write landed in the file while the remote version replaced it: keep that content
        as a conflict copy (the remote version keeps the name; nothing the container wrote is lost)."""
        stamp = datetime.now(UTC)
        copy = conflict_name(it.rel, stamp, self.ctx.node_id, self.vol.conflicts.name_taken)

        async def save() -> None:
            try:
                kept, _ = await asyncio.to_thread(localfs.save_displaced, self.root, copy, fd,
                                                  next_name=self.vol.conflicts.free_copy_name(it.rel, stamp))
            except (OSError, PathError) as exc:
                log.error("volume %s: could not keep the local write to %s that raced with a remote version: %s",
                          self.name, it.rel, exc)
                return
            self.vol.dirty.add(kept)
            self.vol.kick.set()
            self.vol.conflicts.record(it.rel, kept, it.m.origin, self.ctx.node_id)

        task = asyncio.get_running_loop().create_task(save(), name=f"keep-{self.name}")
        self.vol.side_tasks.add(task)
        task.add_done_callback(self.vol.side_tasks.discard)

    async def apply_large(self, it: Pending) -> None:
        """Stream a big file in waves of chunks, written at their offsets in a temp file.

        To keep the origin's upload from growing with the number of nodes, every node starts at a
        different wave (a hash of its id), asks a few other holders before the origin, and serves the
        chunks it has already written to its temp file to the others while it is still applying."""
        locs_all = self.vol.fetcher.locations({cid for cid, _ in it.m.chunks})
        m = it.m
        dfd, tmp = await asyncio.to_thread(localfs.stage, self.root, it.rel,
                                           Manifest(kind="file", mode=0o600, mtime_ns=m.mtime_ns), lambda c, n: b"")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            await asyncio.to_thread(localfs.discard, dfd, tmp)
            raise
        shared = PartialFile(fd)
        waves = list(wave_groups(with_offsets(m.chunks), LARGE_WAVE_BYTES))
        start = int(chunker.chunk_id(f"{self.ctx.node_id}/{m.digest}".encode())[:8], 16) % max(1, len(waves))
        writing: asyncio.Future[None] | None = None
        try:
            peers: list[str] | None = None
            read_local = self.vol.fetcher.read_local

            sources = self.copy_sources(locs_all)

            def copy_wave(group: list[tuple[str, int, int]]) -> set[int]:
                """Offsets of the wave copied in the kernel from a local file that holds the same
                chunks (the old version, mostly): clones where the file system shares extents."""
                plan: dict[str, list[tuple[int, int, int]]] = {}
                for cid, off, ln in group:
                    for path, soff in sources.get((cid, ln), ()):
                        plan.setdefault(path, []).append((soff, off, ln))
                        break
                done: set[int] = set()
                for path, entries in plan.items():
                    runs: list[tuple[int, int, int]] = []
                    for soff, off, ln in sorted(entries, key=lambda e: e[1]):
                        if runs and runs[-1][0] + runs[-1][2] == soff and runs[-1][1] + runs[-1][2] == off:
                            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + ln)
                        else:
                            runs.append((soff, off, ln))
                    rec = sources.stat[path]
                    if localfs.copy_ranges(self.root, path, rec, fd, runs):
                        done.update(off for _, off, _ in entries)
                return done

            def write(group: list[tuple[str, int, int]], data: dict[str, bytes], copied: set[int]) -> None:
                for cid, off, _ in group:
                    if off in copied:
                        continue
                    view = memoryview(data[cid])
                    while view:
                        n = os.pwrite(fd, view, off)
                        view, off = view[n:], off + n
                lo = min(off for _, off, _ in group)
                localfs.start_writeback(fd, lo, max(off + ln for _, off, ln in group) - lo)

            def published(group: list[tuple[str, int, int]], written: asyncio.Future[None]) -> None:
                if written.exception():
                    return
                for cid, off, ln in group:
                    self.vol.partial.setdefault(cid, (shared, off, ln))

            def read_wave(ids: dict[str, int]) -> dict[str, bytes]:
                return {c: d for c, n in ids.items() if (d := read_local(c, n, locs_all))}

            for group in waves[start:] + waves[:start]:
                copied = await asyncio.to_thread(copy_wave, group) if sources else set()
                metrics.bytes_reused.inc(sum(ln for _, off, ln in group if off in copied))
                ids = {cid: ln for cid, off, ln in group if off not in copied}
                local = await asyncio.to_thread(read_wave, ids)
                missing = [c for c in ids if c not in local]
                data = dict(local)
                metrics.bytes_reused.inc(sum(len(d) for d in local.values()))
                if missing:
                    if peers is None:
                        peers = await self.ctx.peers(self.name, m.origin, True)
                    t0 = time.monotonic()
                    fetched = await self.vol.fetcher.fetch_unlocked(missing, peers) if peers else {}
                    metrics.chunk_fetch_seconds.observe(time.monotonic() - t0)
                    if len(fetched) < len(missing):
                        raise FetchError(f"{len(missing) - len(fetched)} chunk(s) of {it.rel} not available")
                    data.update(fetched)
                # Pipeline: this wave is written while the next one is fetched.
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(write, group, data, copied))
                writing.add_done_callback(functools.partial(published, group))
            if writing is not None:
                await writing
                writing = None

            def finish() -> None:
                os.fchmod(fd, m.mode)
                if localfs.IS_ROOT:
                    os.fchown(fd, m.uid, m.gid)
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
                os.fsync(fd)

            await asyncio.to_thread(finish)
        except BaseException:
            if writing is not None:
                with contextlib.suppress(BaseException):
                    await writing
            self.unshare(shared)
            await shared.close()
            await asyncio.to_thread(localfs.discard, dfd, tmp)
            raise
        self.unshare(shared)
        await shared.close()
        await self.commit([(it, dfd, tmp)])

    def copy_sources(self, locs: dict[str, list[tuple[str, str, int, int]]]) -> CopySources:
        """Where this volume's own files hold chunks of a big file being applied, for in-kernel
        copies: only files whose index record is a regular file (its stat is checked at the copy)."""
        paths = {path for entries in locs.values() for vol, path, _, _ in entries
                 if vol == self.name and not path.startswith(BLOB_PREFIX)}
        out = CopySources()
        if not paths:
            return out
        for path, rec in self.state.files_for(self.name, paths).items():
            if rec.kind == "file":
                out.stat[path] = (rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode)
        for cid, entries in locs.items():
            for vol, path, off, ln in entries:
                if vol == self.name and path in out.stat:
                    out.setdefault((cid, ln), []).append((path, off))
        return out

    def unshare(self, shared: PartialFile) -> None:
        for cid in [c for c, (f, _, _) in self.vol.partial.items() if f is shared]:
            del self.vol.partial[cid]
