"""Apply stage: plan remote changes against the index and the disk, and hand each to its action."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from .. import localfs, metrics
from ..manifest import ManifestError
from ..pathsafe import PathError
from ..state import FileRecord
from .decide import Remote, apply_order, differs, known, latest_versions, plan_remote, superseded, transfer
from .fetch import FetchError
from .guard import Entry
from .pending import Pending, record_of
from .roles import Role
from .stage import Stage
from .versions import Version

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

STREAM_THRESHOLD = 16 * 1024 * 1024  # files above this are written group by group, never whole in memory
WAVE_BYTES = 64 * 1024 * 1024  # chunk bytes held in memory at once while applying small files
APPLY_PAGE = 2048  # manifests per range-read page (<= 12 MiB with 4 KiB inline files) and files per wave
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}


class Applier(Stage):
    """Plans remote changes against the index and the disk and hands each to its action."""

    def not_applied(self, items: list[Pending], resolving: bool = False) -> list[Pending]:
        """The latest version of each path, minus those the index already has (our own publishes
        coming back through the watch, or applied before). Cheap and lock-free, so the watch is read
        at etcd's pace even while a big publish holds the lock."""
        latest = latest_versions(items)
        for it in latest.values():
            old = self.vol.deferred.get(it.rel)
            if old is not None and old.rev <= it.rev:
                del self.vol.deferred[it.rel]  # superseded by a newer version of the same path
        todo: list[Pending] = []
        records = self.state.files_for(self.name, latest)
        for it in latest.values():
            it.rec = records.get(it.rel)
            if not resolving and known(it.rec, it.rev):
                continue  # our own publish, or already applied
            todo.append(it)
        return todo

    async def apply(self, items: list[Pending], resolving: bool = False) -> None:
        """Bring the local replica to the given manifests (called with the lock held)."""
        todo = self.not_applied(items, resolving)
        if not todo:
            return
        if self.vol.role is Role.SEND_ONLY and not resolving:
            # A send-only replica keeps its own state: remote changes are counted, not applied (`override`
            # pushes this node's state over them).
            for it in todo:
                if len(self.vol.remote_ignored) < 100_000:
                    self.vol.remote_ignored[it.rel] = it.rev
            return
        stats = await asyncio.to_thread(localfs.lstat_many, self.root, [it.rel for it in todo])
        clean: list[Pending] = []
        for it in todo:
            it.fs = fs = stats[it.rel]
            it.action = plan_remote(it.m, it.rev, it.rec, fs, STREAM_THRESHOLD, resolving)
            if it.action is Remote.CONFLICT:
                await self.vol.conflicts.local_vs_remote(it)
            else:
                clean.append(it)
        if not clean:
            return
        was_absent = {i.rel for i in clean if i.rec is None or i.rec.kind == "deleted"}
        clean.sort(key=lambda i: apply_order(i.m.kind, i.rel))
        dirs = [i for i in clean if i.action is Remote.DIR]
        files = [i for i in clean if i.action not in (Remote.DIR, Remote.DELETE, Remote.SKIP)]
        deletes = [i for i in clean if i.action is Remote.DELETE]
        # Worker threads touch the disk only; the index is written here, on the loop's connection.
        if dirs:
            self.state.put_files(await asyncio.to_thread(self.apply_dirs, dirs))
        if files:
            await self.apply_files(files)
        if deletes:
            self.state.put_files(await asyncio.to_thread(self.apply_deletes, deletes))
        done = [i for i in clean if i.rec is not None and i.rec.rev == i.rev]
        if done:
            # Paths a peer created count as created within the guard's window (a queue consumed here).
            self.vol.guard.arrived(((Entry(i.rel, i.m.kind, digest=i.m.digest, size=i.m.size), i.rel in was_absent)
                                for i in done if i.m.kind != "deleted"), time.monotonic())
            self.vol.guard.forget(i.rel for i in done if i.m.kind == "deleted")
            now = time.time()
            for i in done:
                metrics.ops_applied.labels(i.m.kind).inc()
                if i.m.kind == "deleted":
                    self.vol.tombstones_seen += 1
                if i.m.inline:
                    metrics.bytes_inline.inc(len(i.m.inline))
                if i.m.ts > 0:
                    metrics.propagation_lag_seconds.observe(max(0.0, now - i.m.ts))
                    self.vol.status.lag_seconds = max(0.0, now - i.m.ts)
            self.vol.status.applied += len(done)
            self.vol.status.last_applied_at = now
            self.ctx.emit("applied", {"volume": self.name, "count": len(done),
                                      "paths": [i.rel for i in done[:20]]})

    def apply_dirs(self, dirs: list[Pending]) -> list[FileRecord]:
        recs = []
        for it in dirs:
            try:
                fs = localfs.make_dir(self.root, it.rel, it.m)
            except (OSError, PathError) as exc:
                self.reject(it, exc)
                continue
            it.rec = record_of(self.name, it.rel, it.m, fs, it.rev)
            recs.append(it.rec)
        return recs

    def apply_deletes(self, deletes: list[Pending]) -> list[FileRecord]:
        recs = []
        kept: list[Version] = []
        for it in deletes:
            old = it.rec
            vid, keep_as = self.vol.keeper.version_slot() if old is not None and old.kind == "file" else ("", "")
            try:
                removed = localfs.remove(self.root, it.rel, keep_as)
            except (OSError, PathError) as exc:
                self.reject(it, exc)
                continue
            if keep_as and old is not None and os.path.lexists(keep_as):
                kept.append(Version(vid, it.rel, time.time(), old.size, old.digest, "deleted", it.m.origin))
            if not removed:
                # A directory deleted elsewhere still holds local content: modify beats delete.
                self.vol.on_loop(self.vol.dirty.add, it.rel)
            it.rec = record_of(self.name, it.rel, it.m, None, it.rev)
            recs.append(it.rec)
        if kept:
            self.vol.on_loop(self.vol.keeper.versions_kept, kept)
        self.vol.on_loop(self.vol.kick.set)
        return recs

    def reject(self, it: Pending, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            # Disk full, quota, read-only remount: nothing wrong with the change; retry it later.
            self.defer(it, exc)
            return
        metrics.rejected_input.labels("apply").inc()
        log.warning("volume %s: cannot apply %s (revision %d): %s", self.name, it.rel, it.rev, exc)

    async def apply_files(self, files: list[Pending]) -> None:
        # New paths first (conflict copies, rename targets): their chunks may live in files that the
        # same batch is about to overwrite.
        for it in [it for it in files if it.m.blob and not it.m.chunks]:
            try:
                await self.vol.fetcher.resolve_blob(it)
            except FetchError as exc:
                self.defer(it, exc)
            except ManifestError as exc:
                metrics.rejected_input.labels("etcd").inc()
                self.reject(it, exc)
        files = [it for it in files if not (it.m.blob and not it.m.chunks)]
        new = [it for it in files if it.rec is None or it.rec.kind == "deleted"]
        if new and len(new) < len(files):
            await self.apply_files(new)
            files = [it for it in files if not (it.rec is None or it.rec.kind == "deleted")]
        small: list[Pending] = []
        for it in files:
            m = it.m
            action = plan_remote(m, it.rev, it.rec, it.fs, STREAM_THRESHOLD, resolving=True)
            if action is Remote.ATTRS:  # same content already here
                try:
                    fs = await asyncio.to_thread(localfs.set_attrs, self.root, it.rel, m)
                except (OSError, PathError) as exc:
                    self.reject(it, exc)
                    continue
                it.rec = record_of(self.name, it.rel, m, fs, it.rev)
                self.state.put_files([it.rec])
                continue
            if action is Remote.RENAME and await self.try_local_rename(it):
                continue
            if transfer(m, STREAM_THRESHOLD) is Remote.STREAM:
                try:
                    await self.vol.committer.apply_large(it)
                except FetchError as exc:
                    self.defer(it, exc)
            else:
                small.append(it)
        # Waves bounded in memory: all chunks a wave lacks are fetched in one batched call.
        wave: list[Pending] = []
        size = 0
        for it in small:
            wave.append(it)
            size += it.m.size if it.m.inline is None else 0
            if size >= WAVE_BYTES or len(wave) >= APPLY_PAGE:
                await self.vol.committer.apply_wave(wave)
                wave, size = [], 0
        if wave:
            await self.vol.committer.apply_wave(wave)

    async def try_local_rename(self, it: Pending) -> bool:
        src = it.m.renamed_from
        srec = self.state.file(self.name, src)
        if srec is None or srec.kind != "file" or srec.digest != it.m.digest:
            return False
        sfs = await asyncio.to_thread(localfs.lstat, self.root, src)
        if sfs is None or differs(srec, sfs) or it.fs is not None:
            return False
        try:
            await asyncio.to_thread(localfs.rename_local, self.root, src, it.rel)
            fs = await asyncio.to_thread(localfs.set_attrs, self.root, it.rel, it.m)
        except (OSError, PathError) as exc:
            self.reject(it, exc)
            return False
        self.state.delete_files(self.name, [src])
        it.rec = record_of(self.name, it.rel, it.m, fs, it.rev)
        self.state.put_files([it.rec])
        return True

    def defer(self, it: Pending, exc: BaseException) -> None:
        if threading.get_ident() != self.vol.loop_thread:
            self.vol.on_loop(self.defer, it, exc)
            return
        cur = self.vol.deferred.get(it.rel)
        if cur is not None and cur.rev > it.rev:
            return  # a newer version of the path already waits; the older one must not replace it
        if superseded(it, self.state.file(self.name, it.rel)):
            return
        if cur is None:
            log.warning("volume %s: %s deferred: %s", self.name, it.rel, exc)
        self.vol.deferred[it.rel] = it
