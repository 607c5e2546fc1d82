"""Scan stage: inotify events and rescans become dirty paths (what changed on disk since the index)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import localfs, metrics
from ..localfs import FileStat
from ..meta import EtcdUnavailable
from ..state import FileRecord, LocalState
from ..watcher import Changes, VolumeWatcher, max_user_instances
from .publish import FLUSH_MAX
from .stage import Stage

if TYPE_CHECKING:
    from .volume import VolumeSync

log = logging.getLogger(__name__)

SCAN_PAGE = 512  # entries of one directory compared with the index at a time by a rescan
EXPAND_MAX = 4 * FLUSH_MAX  # paths a new directory brings into one flush before a rescan takes over
DIRTY_MAX = 65536  # changed paths remembered before a rescan takes over (see Scanner.on_changes)


class Scanner(Stage):
    """Finds what changed on disk: inotify batches and stat walks become dirty paths."""

    def __init__(self, vol: VolumeSync) -> None:
        super().__init__(vol)
        self._overflows_seen = 0

    def start_watcher(self) -> None:
        self.vol.watcher = VolumeWatcher(self.root, self.on_changes, ignore=self.vol.ignored,
                                         debounce=self.ctx.debounce, hub=self.ctx.inotify)
        try:
            self.vol.watcher.start()
        except OSError as exc:
            # The daemon's one inotify instance could not be made (other programs of this user hold
            # fs.inotify.max_user_instances, 128 by default): rescans every 5 s keep the volume correct.
            hint = (" (inotify instance limit reached: raise it with sysctl fs.inotify.max_user_instances="
                    f"{max_user_instances() * 4})" if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
            self.vol.watcher.degraded = True
            self.vol.watcher.degraded_reason = f"inotify unavailable: {exc.strerror}{hint}"
        if self.vol.watcher.degraded:
            log.warning("volume %s: %s; falling back to rescans every %ss", self.name,
                        self.vol.watcher.degraded_reason, self.ctx.interval)

    def on_changes(self, ch: Changes) -> None:
        self.vol.dirty.update(p for p in ch.paths if not self.vol.ignored(p))
        if len(self.vol.dirty) > DIRTY_MAX:
            # A huge burst (a million files copied in): stop remembering paths, the per-directory
            # rescan finds them from the disk and the index in bounded batches. Memory stays flat.
            self.vol.dirty.clear()
            self.vol.rescan_needed.set()
        if ch.rescan:
            overflows = self.vol.watcher.overflows if self.vol.watcher else 0
            if overflows > self._overflows_seen:
                metrics.inotify_overflows.inc(overflows - self._overflows_seen)
                self._overflows_seen = overflows
            self.vol.rescan_needed.set()
        metrics.pending_items.labels(self.name).set(len(self.vol.dirty))
        self.vol.kick.set()

    async def run(self) -> None:
        """The safety net: a periodic stat walk catches anything inotify missed."""
        while True:
            interval = self.ctx.interval
            if self.vol.watcher is not None and self.vol.watcher.degraded:
                interval = min(interval, 5.0)
            await asyncio.sleep(interval * (0.9 + 0.2 * random.random()))
            if self.vol.ready.is_set() and self.ctx.etcd_ready.is_set():
                try:
                    await self.rescan("interval")
                except EtcdUnavailable:
                    pass
                except asyncio.CancelledError:
                    raise
                except Exception:  # the safety net must outlive any one failure
                    log.exception("volume %s: periodic rescan failed; next one as scheduled", self.name)

    async def rescan(self, reason: str) -> None:
        """Compare the disk with the index one directory at a time, in a worker thread, and publish the
        differences in bounded batches while the walk goes on."""
        problem = self.vol.check_root()
        if problem:
            self.vol.pause(problem)
            return
        t0 = time.monotonic()
        metrics.rescans.labels(reason).inc()
        loop = asyncio.get_running_loop()
        batches: asyncio.Queue[set[str] | None] = asyncio.Queue()
        room = threading.Semaphore(4)  # back-pressure: at most 4 batches of changes waiting
        stop = threading.Event()

        dirs_seen = 0

        def scan() -> None:
            nonlocal dirs_seen
            db = self.state.reader()
            changed: set[str] = set()

            def hand_over() -> None:
                nonlocal changed
                if changed:
                    while not room.acquire(timeout=0.5):
                        if stop.is_set():
                            return
                    loop.call_soon_threadsafe(batches.put_nowait, changed)
                    changed = set()

            def compare(entries: list[tuple[str, FileStat]]) -> None:
                known = LocalState.stats_for(db, self.name, [rel for rel, _ in entries])
                for rel, fs in entries:
                    t = known.get(rel)
                    if t is None or t[0] != fs.kind:
                        changed.add(rel)
                    elif fs.kind == "dir":
                        if t[4:] != (fs.mode, fs.uid, fs.gid):
                            changed.add(rel)
                    elif t[1:] != (fs.size, fs.mtime_ns, fs.inode, fs.mode, fs.uid, fs.gid):
                        changed.add(rel)
                if len(changed) >= FLUSH_MAX:
                    hand_over()

            try:
                stack = [""]
                while stack and not stop.is_set():
                    d = stack.pop()
                    dirs_seen += 1
                    # Streamed, a few hundred entries at a time: a directory of 50,000 entries costs
                    # the set of its names, not two full copies of its listing and index entries.
                    names: set[str] = set()
                    entries: list[tuple[str, FileStat]] = []
                    for rel, fs in localfs.iter_dir(self.root, d, self.vol.ignored, self.vol.started_ns):
                        names.add(rel)
                        if fs.kind == "dir":
                            stack.append(rel)
                        entries.append((rel, fs))
                        if len(entries) >= SCAN_PAGE:
                            compare(entries)
                            entries = []
                    compare(entries)
                    changed.update(rel for rel in LocalState.children(db, self.name, d)
                                   if rel not in names)  # indexed here but gone from disk
                    if len(changed) >= FLUSH_MAX:
                        hand_over()
                hand_over()
            finally:
                db.close()
                loop.call_soon_threadsafe(batches.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(scan))
        try:
            while (batch := await batches.get()) is not None:
                room.release()
                self.vol.dirty.update(batch)
                while len(self.vol.dirty) >= FLUSH_MAX and not self.vol.root_problem:
                    await self.vol.publisher.flush()
            await self.vol.publisher.flush()
        finally:
            stop.set()
            await worker
        if self.vol.watcher is not None:
            self.vol.watcher.note_directories(dirs_seen)
        metrics.rescan_seconds.observe(time.monotonic() - t0)

    async def expand(self, paths: set[str]) -> tuple[dict[str, FileRecord], dict[str, FileStat | None]]:
        """Index records and current stats of the dirty paths, grown to whole subtrees where needed.

        A vanished directory takes every indexed path below it with it; a directory new to the index
        (created, or renamed within the volume) brings everything below it."""
        recs: dict[str, FileRecord] = {}
        stats: dict[str, FileStat | None] = {}
        todo = set(paths)
        while todo:
            recs.update(self.state.files_for(self.name, todo))

            def ignored_under(top: str) -> Callable[[str, bool], bool]:
                return lambda rel, is_dir: self.vol.ignored(f"{top}/{rel}", is_dir)

            def look(todo: set[str] = todo) -> tuple[dict[str, FileStat | None], set[str]]:
                st = localfs.lstat_many(self.root, todo)
                found: set[str] = set()
                for p, fs in st.items():
                    rec = recs.get(p)
                    if fs is not None and fs.kind == "dir" and (rec is None or rec.kind != "dir"):
                        for rel, _ in localfs.walk(os.path.join(self.root, p), ignored_under(p)):
                            found.add(f"{p}/{rel}")
                            if len(found) >= EXPAND_MAX:
                                # A big tree moved in: the streamed rescan publishes the rest in
                                # bounded batches instead of one flush holding all of it.
                                self.vol.on_loop(self.rescan_soon)
                                return st, found
                return st, found

            new_stats, more = await asyncio.to_thread(look)
            stats.update(new_stats)
            for p, fs in new_stats.items():
                rec = recs.get(p)
                if fs is None and rec is not None and rec.kind == "dir":
                    more.update(x.path for x in self.state.files(self.name, p) if x.kind != "deleted")
            todo = more - stats.keys()
        return recs, stats

    def rescan_soon(self) -> None:
        self.vol.rescan_needed.set()
        self.vol.kick.set()
