"""The sync engine: publish local changes, apply remote ones, resolve conflicts, for each held volume.

One `VolumeSync` per volume this node holds. Data flows one way through it:
  watcher/scanner -> dirty paths -> describe (hash) -> CAS publish in etcd -> index
  etcd watch -> validate -> local chunks + peer fetch -> stage temp files -> syncfs -> rename -> index
Publishing and applying of one volume are serialised by a lock, which keeps the conflict logic
simple: a remote change is applied only after checking that the local path has no unpublished edit.
etcd orders everything; a failed compare-and-swap is the only way a conflict is detected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import chunker, localfs, metrics
from .ignore import IgnoreMatcher
from .localfs import FileStat
from .manifest import Manifest, ManifestError, decode, parse_chunk_list
from .meta import MAX_TXN_OPS, EtcdStore, EtcdUnavailable, ResyncRequired, WatchEvent, WatchInterrupted
from .meta import loads as meta_loads
from .pathsafe import PathError, conflict_name, is_internal_name, validate_relpath
from .state import BLOB_PREFIX, FileRecord, LocalState
from .sync.decide import differs
from .sync.guard import DeleteGuard, Entry
from .volopts import VolumeOptions
from .watcher import Changes, VolumeWatcher, max_user_instances

log = logging.getLogger(__name__)

STREAM_THRESHOLD = 16 * 1024 * 1024  # files above this are written group by group, never whole in memory
WAVE_BYTES = 64 * 1024 * 1024  # chunk bytes held in memory at once while applying small files
LARGE_WAVE_BYTES = 32 * 1024 * 1024  # per wave of a streamed big file (two waves in flight)
APPLY_PAGE = 2048  # manifests per range-read page (<= 12 MiB with 4 KiB inline files) and files per wave
FLUSH_MAX = 1024  # paths hashed and published per round (a slice of inline files is ~20 MB in flight)
SCAN_PAGE = 512  # entries of one directory compared with the index at a time by a rescan
EXPAND_MAX = 4 * FLUSH_MAX  # paths a new directory brings into one flush before a rescan takes over
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}
DEFER_MAX = 5000  # remote changes waiting for unavailable chunks before the watch is no longer read
DIRTY_MAX = 65536  # changed paths remembered before a rescan takes over (see _on_changes)
REFRESH_MAX = 256  # deferred items re-read from etcd before a retry (see VolumeSync._refreshed)


class FetchError(RuntimeError):
    """Some chunks could not be had from any peer: the change stays pending and is retried."""


@dataclass
class EngineContext:
    """What the engine needs from the daemon, and nothing else (no HTTP routes, no Docker)."""

    node_id: str
    data_root: str
    state: LocalState
    conflict_default: str
    keep_copies_default: bool
    interval: float
    debounce: float
    get_store: Callable[[], EtcdStore | None]
    etcd_ready: asyncio.Event
    fetch: Callable[[str, list[str], list[str]], Awaitable[dict[str, bytes]]]
    peers: Callable[[str, str, bool], Awaitable[list[str]]]  # (volume, origin, spread load)
    emit: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    mass_delete_threshold: float = 0.5
    mass_delete_min_files: int = 20
    mass_delete_window: float = 10.0
    max_manifest_bytes: int = 512 * 1024


_differs = differs  # still imported by opsapi until it takes sync.decide.differs


def _record(volume: str, rel: str, m: Manifest, fs: FileStat | None, rev: int) -> FileRecord:
    return FileRecord(
        volume=volume, path=rel, kind=m.kind, size=m.size, mtime_ns=fs.mtime_ns if fs else m.mtime_ns,
        ctime_ns=fs.ctime_ns if fs else 0, inode=fs.inode if fs else 0, mode=m.mode, uid=m.uid, gid=m.gid,
        digest=m.digest, chunks=m.chunks, target=m.target, rev=rev, origin=m.origin)


def _with_offsets(chunks: list[list[Any]]) -> list[tuple[str, int, int]]:
    out = []
    off = 0
    for cid, ln in chunks:
        out.append((cid, off, ln))
        off += ln
    return out


def _waves(chunks: list[tuple[str, int, int]], limit: int) -> Iterator[list[tuple[str, int, int]]]:
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


class _PartialFile:
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


def _superseded(it: _Pending, cur: FileRecord | None) -> bool:
    """Whether a newer version of the path (`cur`, its index record now) was applied while `it` waited
    (fetches run without the volume lock, and deferred items are retried later): the older one must
    then be dropped, neither written over the newer one nor taken for a local edit."""
    if cur is None or cur.rev < it.rev:
        return False
    # The same revision counts only if it was recorded after this item was read (an operator's
    # re-fetch of the current version comes without a record and must go through).
    return cur.rev > it.rev or (it.rec is not None and cur.rev != it.rec.rev)


def _depth(rel: str) -> int:
    return rel.count("/")


@dataclass
class _Pending:
    """A remote change waiting to be applied."""

    rel: str
    m: Manifest
    rev: int
    rec: FileRecord | None = None
    fs: FileStat | None = None


@dataclass
class VolumeStatus:
    ready: bool = False
    revision: int = 0
    last_error: str = ""
    published: int = 0
    applied: int = 0
    conflicts: int = 0
    last_applied_at: float = 0.0
    lag_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class VolumeSync:
    """Keeps one volume's local replica and etcd in agreement."""

    def __init__(self, ctx: EngineContext, name: str, options: VolumeOptions) -> None:
        self.ctx = ctx
        self.name = name
        self.options = options
        self.base = os.path.join(ctx.data_root, "volumes", name)
        self.root = os.path.join(self.base, "_data")
        self.matcher = IgnoreMatcher(options.ignore)
        self.mode = options.conflict_resolution or ctx.conflict_default
        self.keep_copies = options.keep_conflict_copies and ctx.keep_copies_default
        self.state = ctx.state
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self.dirty: set[str] = set()
        self.rescan_needed = asyncio.Event()
        self.kick = asyncio.Event()
        self.watcher: VolumeWatcher | None = None
        self.status = VolumeStatus()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        # Remote changes whose chunks no peer could serve yet: retried, and the stored watch revision
        # never moves past them, so a restart replays them instead of forgetting them.
        self.deferred: dict[str, _Pending] = {}
        self.retry_now = asyncio.Event()
        self.tombstones_seen = 0  # deletions published or applied here (housekeeping skips idle volumes)
        self._drained = asyncio.Event()
        self._drained.set()
        # Guards against mass damage. A missing or replaced volume directory stops everything for this
        # volume (nothing on disk can be trusted); a mass deletion holds only the deletions (the guard
        # module). Both wait for an operator (accept the local state, or restore from the cluster).
        self.root_problem = ""
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self.guard = DeleteGuard(ctx.mass_delete_threshold, ctx.mass_delete_min_files, ctx.mass_delete_window)
        self._bypass_guard = False  # the operator accepted the local state: the next rescan publishes it all
        self._review_at: asyncio.TimerHandle | None = None
        self._overflows_seen = 0
        self.partial: dict[str, tuple[_PartialFile, int, int]] = {}  # chunks of big files being applied
        self._side_tasks: set[asyncio.Task[None]] = set()  # conflict copies being saved

    # ---- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._started_ns = time.time_ns()  # temp files older than this belong to a previous daemon
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        self.state.hold(self.name)
        known = self.state.get_meta(f"root:{self.name}")
        if known is None or known.count(":") == 1:  # none yet, or recorded before the mark existed
            self._remember_root()
        if self.state.revision(self.name) > 0:
            self._start_watcher()
        # else: a first attach. The watcher starts after the initial copy (see _reconcile): our own
        # writes of a million files would only come back as a million events to filter, and the
        # rescan that ends the reconcile finds anything written locally meanwhile.
        self._tasks = [asyncio.create_task(self._run(), name=f"sync-{self.name}"),
                       asyncio.create_task(self._publisher(), name=f"publish-{self.name}"),
                       asyncio.create_task(self._rescanner(), name=f"rescan-{self.name}"),
                       asyncio.create_task(self._retry_deferred(), name=f"retry-{self.name}")]
        for t in self._tasks:
            t.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """These loops run for the volume's lifetime: one ending on its own is a bug to see at once."""
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        self.status.last_error = f"{task.get_name()} stopped: {exc!r}"
        log.error("volume %s: %s stopped unexpectedly: %r", self.name, task.get_name(), exc, exc_info=exc)

    def _start_watcher(self) -> None:
        self.watcher = VolumeWatcher(self.root, self._on_changes, ignore=self._ignored_path,
                                     debounce=self.ctx.debounce)
        try:
            self.watcher.start()
        except OSError as exc:
            # One inotify instance per volume: past fs.inotify.max_user_instances (128 by default)
            # this volume is kept correct by rescans every 5 s instead.
            hint = (" (inotify instance limit reached: raise it with sysctl fs.inotify.max_user_instances="
                    f"{max_user_instances() * 4})" if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
            self.watcher.degraded = True
            self.watcher.degraded_reason = f"inotify unavailable: {exc.strerror}{hint}"
        if self.watcher.degraded:
            log.warning("volume %s: %s; falling back to rescans every %ss", self.name,
                        self.watcher.degraded_reason, self.ctx.interval)

    async def stop(self) -> None:
        self._stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        if self._side_tasks:  # conflict copies being saved: let them finish
            await asyncio.wait(set(self._side_tasks), timeout=6)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    # ---- guard against mass damage
    _XATTR = "trusted.syncmesh.root" if os.geteuid() == 0 else "user.syncmesh.root"

    def _root_id(self) -> str:
        """Device, inode and a mark left on the directory itself: a new directory can get the freed
        inode number of the old one, but not its extended attribute."""
        try:
            st = os.stat(self.root)
        except OSError:
            return ""
        try:
            mark = os.getxattr(self.root, self._XATTR).decode()
        except OSError:
            mark = ""
        return f"{st.st_dev}:{st.st_ino}:{mark}"

    def _remember_root(self) -> None:
        with contextlib.suppress(OSError):  # file systems without xattrs: device and inode only
            os.setxattr(self.root, self._XATTR, uuid.uuid4().hex.encode())
        self.state.set_meta(f"root:{self.name}", self._root_id())

    def _root_problem(self) -> str:
        """A vanished or replaced volume directory (an unmounted disk, a restored backup) must not be
        published as "every file deleted"."""
        now = self._root_id()
        if not now:
            return f"the volume directory {self.root} is missing"
        if now != self.state.get_meta(f"root:{self.name}"):
            return f"the volume directory {self.root} was replaced (device/inode changed)"
        return ""

    @property
    def paused(self) -> str:
        """Why this volume waits for an operator ("" when it does not)."""
        if self.root_problem:
            return f"{self.root_problem}; nothing syncs until an operator decides"
        return self.guard.paused

    def pause(self, reason: str) -> None:
        """The volume directory cannot be trusted: stop publishing and applying until an operator decides."""
        if not self.root_problem:
            self._announce_pause(f"{reason}; nothing syncs until an operator decides")
        self.root_problem = reason
        self.status.last_error = f"paused: {self.paused}"
        self._unpaused.clear()

    def _announce_pause(self, reason: str) -> None:
        log.error("volume %s: paused: %s; run `syncmesh-plugin resume %s` to accept the local state, or "
                  "`syncmesh-plugin resume %s --restore` to take the cluster's", self.name, reason, self.name,
                  self.name, extra={"volume": self.name})
        self.ctx.emit("paused", {"volume": self.name, "reason": reason})
        metrics.volume_paused.labels(self.name).set(1)

    def _schedule_review(self) -> None:
        """Wake the publisher when the held burst of deletions is due for its judgement."""
        due = self.guard.due(time.monotonic())
        if due is None or self.guard.paused:
            return  # nothing held, or paused: reviewed on every flush (paths written again lift it)
        if self._review_at is not None:
            self._review_at.cancel()
        self._review_at = asyncio.get_running_loop().call_later(due + 0.005, self.kick.set)

    async def _review_guard(self) -> None:
        """Judge a held burst of deletions that has settled: release it, or pause the deletions."""
        if self.guard.due(time.monotonic()) is None:
            return
        held = list(self.guard.held)
        if held:  # paths a peer deleted too, or that are back on disk, are no longer held deletions
            recs = self.state.files_for(self.name, held)
            back = await asyncio.to_thread(lambda: {p for p in held if localfs.lstat(self.root, p) is not None})
            self.guard.forget(p for p in held if p in back or (r := recs.get(p)) is None or r.kind == "deleted")
        review = self.guard.review(time.monotonic(), lambda: self.state.volume_stats(self.name)["files"])
        if review.paused:
            self._announce_pause(review.paused)
            self.status.last_error = f"paused: {review.paused}"
        if review.lifted and not self.root_problem:
            log.warning("volume %s: mass-deletion pause lifted: the held paths were written again or fell "
                        "below the share", self.name)
            self.status.last_error = ""
            metrics.volume_paused.labels(self.name).set(0)
        if review.release:
            self.dirty.update(review.release)
            self.kick.set()
        metrics.held_deletions.labels(self.name).set(len(self.guard.held))
        self._schedule_review()

    async def resume(self, restore: bool = False) -> None:
        """Operator decision after a pause: accept the local state as the truth (publish it, deletions
        included), or restore: forget the local index and take everything back from the cluster."""
        async with self.lock:
            self._remember_root()
            if restore:
                self.guard.restore()
                self.dirty.clear()
                self.state.delete_files(self.name, [r.path for r in self.state.files(self.name)])
                self.state.set_synced(self.name, False)
                self._tasks[0].cancel()  # leave the watch: the next run starts with a full reconcile
            else:
                self.dirty.update(self.guard.accept(time.monotonic()))
                self._bypass_guard = True
                self.rescan_needed.set()
            self.root_problem = ""
            self.status.last_error = ""
            self._unpaused.set()
            metrics.volume_paused.labels(self.name).set(0)
        if restore:
            with contextlib.suppress(asyncio.CancelledError):
                await self._tasks[0]
            self._tasks[0] = asyncio.create_task(self._run(), name=f"sync-{self.name}")
        self.kick.set()
        log.warning("volume %s: resumed by the operator (%s)", self.name, "restore" if restore else "accept")

    def _ignored_path(self, rel: str, is_dir: bool = False) -> bool:
        return is_internal_name(rel) or self.matcher.ignored(rel, is_dir)

    def _on_changes(self, ch: Changes) -> None:
        self.dirty.update(p for p in ch.paths if not self._ignored_path(p))
        if len(self.dirty) > DIRTY_MAX:
            # A huge burst (a million files copied in): stop remembering paths, the per-directory
            # rescan finds them from the disk and the index in bounded batches. Memory stays flat.
            self.dirty.clear()
            self.rescan_needed.set()
        if ch.rescan:
            overflows = self.watcher.overflows if self.watcher else 0
            if overflows > self._overflows_seen:
                metrics.inotify_overflows.inc(overflows - self._overflows_seen)
                self._overflows_seen = overflows
            self.rescan_needed.set()
        metrics.pending_items.labels(self.name).set(len(self.dirty))
        self.kick.set()

    @property
    def store(self) -> EtcdStore:
        s = self.ctx.get_store()
        if s is None:
            raise EtcdUnavailable("etcd is not connected")
        return s

    # ---- main loop: catch up, then follow the etcd watch
    async def _run(self) -> None:
        backoff = 0.2
        rewatch = False  # only the watch broke: follow on from the stored revision, no rescan needed
        while not self._stopping:
            await self.ctx.etcd_ready.wait()
            try:
                rev = self.state.revision(self.name)
                if rev == 0 or not self.state.is_synced(self.name):
                    rev = await self._reconcile()
                elif not rewatch:
                    await self._rescan("restart")
                rewatch = False
                target = await self.store.latest_revision(self.name)
                if rev >= target:
                    self._mark_ready()
                await self._follow(rev, target)
            except ResyncRequired as exc:
                log.warning("volume %s: %s; reconciling from a full read", self.name, exc)
                self.state.set_synced(self.name, False)
                continue
            except WatchInterrupted as exc:
                log.info("volume %s: %s; following on from revision %d", self.name, exc,
                         self.state.revision(self.name))
                rewatch = True
                continue
            except (EtcdUnavailable, FetchError) as exc:
                self.status.last_error = str(exc)
                log.warning("volume %s: %s; retrying", self.name, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep syncing other volumes; report and retry this one
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("volume %s: sync loop failed; retrying", self.name)
            if self.watcher is None and not self._stopping:
                self._start_watcher()  # the first copy is stuck: local writes must not wait for it
            await asyncio.sleep(backoff + random.random() * backoff)
            backoff = min(backoff * 2, 5.0)

    def _mark_ready(self) -> None:
        if not self.ready.is_set():
            self.ready.set()
            self.status.ready = True
            self.state.set_synced(self.name, True)
            self.ctx.emit("volume_ready", {"volume": self.name})

    async def _follow(self, rev: int, ready_at: int) -> None:
        prefix = self.store.files_prefix(self.name)
        async for batch in self.store.watch(prefix, rev + 1):
            if self.root_problem:
                await self._unpaused.wait()
            while len(self.deferred) >= DEFER_MAX:
                # Back-pressure: peers cannot serve what we need; stop reading the watch (gRPC flow
                # control holds the rest in etcd) until retries drain the backlog.
                self._drained.clear()
                await self._drained.wait()
            if batch.events:
                # Filtered against the index without the lock (_unseen); _apply checks again under it.
                items = [p for ev in self._unseen(batch.events)
                         if (p := self._parse(ev.key, ev.value or b"", ev.mod_revision)) is not None]
                if items:
                    async with self.lock:
                        await self._apply(items)
            safe = batch.revision
            if self.deferred:
                safe = min(safe, min(p.rev for p in self.deferred.values()) - 1)
            self.state.set_revision(self.name, safe)
            self.status.revision = batch.revision
            self.status.last_error = ""
            if batch.revision >= ready_at:
                self._mark_ready()

    def _unseen(self, events: list[WatchEvent]) -> list[WatchEvent]:
        """The events the index does not have yet, before any is decoded: while this node publishes a
        big tree, nearly every event is its own publish coming back, and decoding each would cost the
        publisher as much CPU again as encoding it."""
        latest: dict[str, WatchEvent] = {}
        for ev in events:
            if ev.value is None:
                continue  # keys are only deleted when the volume is removed
            rel = self.store.path_of(self.name, ev.key)
            cur = latest.get(rel)
            if cur is None or ev.mod_revision > cur.mod_revision:
                latest[rel] = ev
        known = self.state.revisions_for(self.name, latest)
        out = []
        for rel, ev in latest.items():
            if known.get(rel, 0) >= ev.mod_revision:
                old = self.deferred.get(rel)
                if old is not None and old.rev <= ev.mod_revision:
                    del self.deferred[rel]  # superseded by a version already in the index
                continue
            out.append(ev)
        return out

    def _parse(self, key: bytes, value: bytes, rev: int) -> _Pending | None:
        rel = self.store.path_of(self.name, key)
        try:
            validate_relpath(rel)
            if is_internal_name(rel):
                raise PathError("internal temp name")
            m = decode(value)
        except (PathError, ManifestError) as exc:
            metrics.rejected_input.labels("etcd").inc()
            log.warning("volume %s: rejected manifest for %r at revision %d: %s", self.name, rel[:200], rev, exc)
            return None
        if self._ignored_path(rel, m.kind == "dir"):
            return None
        return _Pending(rel, m, rev)

    async def _reconcile(self) -> int:
        """Full agreement with etcd from a range read: first attach, or history compacted away.

        Streamed: pages of manifests are applied as they arrive, the paths seen are kept in a scratch
        table on disk, then a per-directory rescan publishes what only this node has. Memory follows
        the page size and the widest directory, not the size of the volume."""
        store = self.store
        await self._unpaused.wait()
        async with self.lock:
            rev, pages = await store.get_range(store.files_prefix(self.name), page=APPLY_PAGE)
            self.state.begin_seen()
            async for page in pages:
                items = []
                names = []
                for kv in page:
                    names.append(store.path_of(self.name, kv.key))
                    p = self._parse(kv.key, kv.value, kv.mod_revision)
                    if p is not None:
                        items.append(p)
                self.state.add_seen(names)
                await self._apply(items)
                if len(self.deferred) >= DEFER_MAX:
                    # Peers cannot serve what we need: stop here with memory bounded; the whole reconcile
                    # runs again later (what was applied is skipped then) and the revision is not advanced.
                    self.deferred.clear()
                    raise FetchError(f"{DEFER_MAX} changes wait for chunks no reachable peer has")
            gc = await store.get(store.key("gc", self.name))
            horizon = int(meta_loads(gc.value).get("revision", 0)) if gc is not None else 0
            # Index entries etcd no longer has: deleted elsewhere while we were away and their tombstones
            # already collected (delete them here, unless changed since), or never published (publish).
            removed = 0
            for batch in self.state.unseen_files(self.name):
                stats = await asyncio.to_thread(lambda b=batch: [localfs.lstat(self.root, r.path) for r in b])
                collected = sorted((r.path for r, fs in zip(batch, stats, strict=True)
                                    if fs is not None and 0 < r.rev <= horizon and not differs(r, fs)),
                                   key=_depth, reverse=True)
                kept = set(await asyncio.to_thread(
                    lambda c=collected: [p for p in c if not localfs.remove(self.root, p)]))
                gone = [r.path for r, fs in zip(batch, stats, strict=True)
                        if fs is None or (r.path in collected and r.path not in kept)]
                self.state.delete_files(self.name, gone)
                removed += len(gone)
                self.dirty.update(r.path for r, fs in zip(batch, stats, strict=True)
                                  if fs is not None and r.path not in collected)
            if removed:
                log.info("volume %s: %d index entries no longer in etcd dropped (tombstones collected while this "
                         "node was away are deleted here)", self.name, removed, extra={"volume": self.name})
            self.state.set_revision(self.name, rev)
        if self.watcher is None and not self._stopping:
            self._start_watcher()  # before the rescan, so nothing written from now on is missed
        # Whatever exists only here (not in the index now) is published.
        await self._rescan("reconcile")
        return rev

    async def _retry_deferred(self) -> None:
        delay = 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.retry_now.wait(), delay)  # a peer came back: retry at once
            self.retry_now.clear()
            if len(self.deferred) < DEFER_MAX // 2:
                self._drained.set()
            if not self.deferred or not self.ctx.etcd_ready.is_set():
                delay = 1.0
                continue
            async with self.lock:
                items, self.deferred = list(self.deferred.values()), {}
                try:
                    items = await self._refreshed(items)
                    await self._apply(items)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never let the retry loop die: these items would wait forever
                    if not isinstance(exc, EtcdUnavailable):
                        log.exception("volume %s: retrying %d deferred change(s) failed; will retry", self.name,
                                      len(items))
                    for it in items:
                        self.deferred.setdefault(it.rel, it)
            delay = min(delay * 2, 15.0) if self.deferred else 1.0
            if len(self.deferred) < DEFER_MAX // 2:
                self._drained.set()

    async def _refreshed(self, items: list[_Pending]) -> list[_Pending]:
        """Deferred items replaced by the version etcd holds now, when it is newer: a node must never keep
        chasing chunks of a version that every peer has since overwritten. (Bounded: large backlogs are
        mostly new files, refreshed by the watch itself.)"""
        if len(items) > REFRESH_MAX:
            return items
        out = []
        for it in items:
            kv = await self.store.get(self.store.file_key(self.name, it.rel))
            fresh = self._parse(kv.key, kv.value, kv.mod_revision) if kv is not None else None
            out.append(fresh if fresh is not None and fresh.rev > it.rev else it)
        return out

    # ---- publishing
    async def _publisher(self) -> None:
        while True:
            await self.kick.wait()
            self.kick.clear()
            if self.guard.due(time.monotonic()) is not None:
                try:
                    async with self.lock:
                        await self._review_guard()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the held deletions stay held; the next kick judges them again
                    log.exception("volume %s: reviewing held deletions failed", self.name)
            if not self.dirty and not self.rescan_needed.is_set():
                continue
            if not self.ctx.etcd_ready.is_set() or self.ctx.get_store() is None:
                await asyncio.sleep(0.5)  # changes stay queued (the disk is the durable queue)
                self.kick.set()
                continue
            try:
                if self.rescan_needed.is_set():
                    self.rescan_needed.clear()
                    accepting = self._bypass_guard
                    await self._rescan("accept" if accepting else "overflow")
                    if accepting:
                        self._bypass_guard = False
                else:
                    await self._flush()
            except EtcdUnavailable as exc:
                self.status.last_error = str(exc)
                log.warning("volume %s: publishing paused: %s", self.name, exc)
                await asyncio.sleep(1.0)
                self.kick.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("volume %s: publish failed; will retry", self.name)
                await asyncio.sleep(1.0)
                self.kick.set()

    async def _rescanner(self) -> None:
        """The safety net: a periodic stat walk catches anything inotify missed."""
        while True:
            interval = self.ctx.interval
            if self.watcher is not None and self.watcher.degraded:
                interval = min(interval, 5.0)
            await asyncio.sleep(interval * (0.9 + 0.2 * random.random()))
            if self.ready.is_set() and self.ctx.etcd_ready.is_set():
                try:
                    await self._rescan("interval")
                except EtcdUnavailable:
                    pass
                except asyncio.CancelledError:
                    raise
                except Exception:  # the safety net must outlive any one failure
                    log.exception("volume %s: periodic rescan failed; next one as scheduled", self.name)

    async def _rescan(self, reason: str) -> None:
        """Compare the disk with the index one directory at a time, in a worker thread, and publish the
        differences in bounded batches while the walk goes on."""
        problem = self._root_problem()
        if problem:
            self.pause(problem)
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
                    for rel, fs in localfs.iter_dir(self.root, d, self._ignored_path, self._started_ns):
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
                self.dirty.update(batch)
                while len(self.dirty) >= FLUSH_MAX and not self.root_problem:
                    await self._flush()
            await self._flush()
        finally:
            stop.set()
            await worker
        if self.watcher is not None:
            self.watcher.note_directories(dirs_seen)
        metrics.rescan_seconds.observe(time.monotonic() - t0)

    async def _flush(self) -> None:
        """Publish every dirty path: hash what changed, CAS in batched transactions."""
        async with self.lock:
            if not self.dirty or self.root_problem:
                return
            problem = self._root_problem()
            if problem:
                self.pause(problem)
                return
            # Bounded slices: a first publish of a million files never holds a million manifests.
            if len(self.dirty) <= FLUSH_MAX:
                paths, self.dirty = self.dirty, set()
            else:
                paths = set(itertools.islice(self.dirty, FLUSH_MAX))
                self.dirty -= paths
                self.kick.set()
            metrics.pending_items.labels(self.name).set(0)
            recs, stats = await self._expand(paths)
            paths = set(stats)
            now = time.time()
            node = self.ctx.node_id

            def build() -> tuple[list[tuple[str, Manifest, FileStat | None]], set[str]]:
                out: list[tuple[str, Manifest, FileStat | None]] = []
                unstable: set[str] = set()
                gone = {p: r for p, r in recs.items() if stats.get(p) is None and r.kind == "file"}
                by_inode = {(r.inode, r.size, r.mtime_ns): p for p, r in gone.items()}
                for p in sorted(paths):
                    fs, rec = stats[p], recs.get(p)
                    if fs is None:
                        if rec is not None and rec.kind != "deleted":
                            out.append((p, Manifest(kind="deleted", origin=node, ts=now), None))
                        continue
                    if rec is not None and not differs(rec, fs):
                        continue  # unchanged, or our own write coming back through inotify
                    src = by_inode.get((fs.inode, fs.size, fs.mtime_ns)) if fs.kind == "file" else None
                    if src is not None and rec is None and fs.size > chunker.INLINE_MAX:
                        r = gone[src]  # a rename: reuse the content description, no re-hash
                        m = Manifest(kind="file", size=r.size, mode=fs.mode, uid=fs.uid, gid=fs.gid,
                                     mtime_ns=fs.mtime_ns, digest=r.digest, chunks=r.chunks or [], origin=node,
                                     ts=now, renamed_from=src)
                        out.append((p, m, fs))
                        continue
                    m = localfs.describe(self.root, p, fs, node, now)
                    if m is None:
                        unstable.add(p)
                    else:
                        out.append((p, m, fs))
                return out, unstable

            built, unstable = await asyncio.to_thread(build)
            await asyncio.to_thread(self._blobify, built)
            built = self._guarded(built, recs)
            if unstable:
                self.dirty.update(unstable)
                asyncio.get_running_loop().call_later(0.05, self.kick.set)
            # Parents before children, new paths before deletions (a rename's source is still there).
            built.sort(key=lambda t: (t[1].kind == "deleted", -_depth(t[0]) if t[1].kind == "deleted"
                                      else _depth(t[0])))
            try:
                for i in range(0, len(built), MAX_TXN_OPS):
                    await self._publish(built[i:i + MAX_TXN_OPS], recs)
            except EtcdUnavailable:
                self.dirty.update(p for p, _, _ in built)
                raise

    def _guarded(self, built: list[tuple[str, Manifest, FileStat | None]], recs: dict[str, FileRecord]
                 ) -> list[tuple[str, Manifest, FileStat | None]]:
        """What of this flush may be published now: everything but the deletions the guard holds
        (see sync.guard). Written paths are told to the guard first, so a rename's old paths in the
        same flush are seen as moved, not lost."""
        now = time.monotonic()
        self.guard.arrived(((Entry(p, m.kind, fs.inode if fs else 0, m.size, fs.mtime_ns if fs else m.mtime_ns,
                                   m.digest), (r := recs.get(p)) is None or r.kind == "deleted")
                            for p, m, fs in built if m.kind != "deleted"), now)
        gone = [Entry(p, r.kind, r.inode, r.size, r.mtime_ns, r.digest)
                for p, m, _ in built if m.kind == "deleted" and (r := recs.get(p)) is not None]
        if not gone:
            return built
        verdict = self.guard.judge(gone, now, accept=self._bypass_guard)
        if verdict.hold:
            self._schedule_review()
            metrics.held_deletions.labels(self.name).set(len(self.guard.held))
            return [b for b in built if b[0] not in verdict.hold]
        return built

    def _blobify(self, built: list[tuple[str, Manifest, FileStat | None]]) -> None:
        """Chunk lists too big for an etcd value (files of several GiB) are stored as a blob that peers
        fetch like file data; the manifest then carries only the blob's chunks and digest."""
        limit = self.ctx.max_manifest_bytes
        for _, m, _ in built:
            if m.kind == "file" and m.inline is None and len(m.chunks) * 44 > limit // 2 and len(m.encode()) > limit:
                data = json.dumps(m.chunks, separators=(",", ":")).encode()
                m.blob_digest, m.blob = localfs.write_blob(self.base, data)

    async def _resolve_blob(self, it: _Pending) -> None:
        """Fetch, verify and parse the chunk list of a manifest that carries it as a blob."""
        m = it.m
        got, _ = await self._gather([_Pending(it.rel, Manifest(kind="file", chunks=m.blob, origin=m.origin), it.rev)],
                                    m.origin)
        data = b"".join(got[cid] for cid, _ in m.blob)
        if chunker.chunk_id(data) != m.blob_digest:
            raise ManifestError("chunk-list blob does not match its digest")
        m.chunks = parse_chunk_list(data, m.size)
        blob_id, chunks = await asyncio.to_thread(localfs.write_blob, self.base, data)
        self.state.put_blob(self.name, blob_id, chunks)

    async def _expand(self, paths: set[str]) -> tuple[dict[str, FileRecord], dict[str, FileStat | None]]:
        """Index records and current stats of the dirty paths, grown to whole subtrees where needed.

        A vanished directory takes every indexed path below it with it; a directory new to the index
        (created, or renamed within the volume) brings everything below it."""
        recs: dict[str, FileRecord] = {}
        stats: dict[str, FileStat | None] = {}
        todo = set(paths)
        while todo:
            recs.update(self.state.files_for(self.name, todo))

            def look(todo: set[str] = todo) -> tuple[dict[str, FileStat | None], set[str]]:
                st = {p: localfs.lstat(self.root, p) for p in todo}
                found: set[str] = set()
                for p, fs in st.items():
                    rec = recs.get(p)
                    if fs is not None and fs.kind == "dir" and (rec is None or rec.kind != "dir"):
                        for rel, _ in localfs.walk(os.path.join(self.root, p),
                                                   lambda r, d, p=p: self._ignored_path(f"{p}/{r}", d)):
                            found.add(f"{p}/{rel}")
                            if len(found) >= EXPAND_MAX:
                                # A big tree moved in: the streamed rescan publishes the rest in
                                # bounded batches instead of one flush holding all of it.
                                self._on_loop(self._rescan_soon)
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

    def _rescan_soon(self) -> None:
        self.rescan_needed.set()
        self.kick.set()

    async def _publish(self, batch: list[tuple[str, Manifest, FileStat | None]],
                       recs: dict[str, FileRecord]) -> None:
        store = self.store
        items = [(store.file_key(self.name, p), m.encode(), r.rev if (r := recs.get(p)) else 0) for p, m, _ in batch]
        ok, rev = await self._cas(items)
        if ok:
            self._published(batch, rev)
            return
        for one, item in zip(batch, items, strict=True):  # someone else changed one of them: find which
            ok, rev = await self._cas([item])
            if ok:
                self._published([one], rev)
            else:
                await self._conflict(one[0], one[1], one[2])

    async def _cas(self, items: list[tuple[bytes, bytes, int]]) -> tuple[bool, int]:
        """Every publish to the volume: compare-and-swap of manifests, rewriting the volume's head key
        in the same transaction (how `latest_revision` knows the latest change without a range read)."""
        return await self.store.cas_put_many(items, self.store.head_key(self.name))

    def _published(self, batch: list[tuple[str, Manifest, FileStat | None]], rev: int) -> None:
        self.state.put_files(_record(self.name, p, m, fs, rev) for p, m, fs in batch)
        for _, m, _ in batch:
            if m.blob:
                self.state.put_blob(self.name, m.blob_digest, m.blob)
        for _, m, _ in batch:
            metrics.ops_published.labels(m.kind).inc()
            if m.kind == "deleted":
                self.tombstones_seen += 1
        self.status.published += len(batch)
        self.ctx.emit("published", {"volume": self.name, "count": len(batch), "revision": rev,
                                    "paths": [p for p, _, _ in batch[:20]]})

    # ---- conflicts
    def _local_wins(self, local: Manifest, remote: Manifest) -> bool:
        if remote.kind == "deleted":
            return True  # modify beats delete
        if local.kind == "deleted":
            return False
        if self.mode == "manual":
            return False  # no winner: the version etcd accepted first keeps the name, the other is a copy
        if self.mode == "size" and local.size != remote.size:
            return local.size > remote.size
        if local.mtime_ns != remote.mtime_ns:
            return local.mtime_ns > remote.mtime_ns
        return self.ctx.node_id > remote.origin

    async def _conflict(self, rel: str, local: Manifest, fs: FileStat | None) -> None:
        """Our compare-and-swap failed: another node changed `rel` concurrently. Decide, keep both."""
        store = self.store
        key = store.file_key(self.name, rel)
        for _ in range(10):
            kv = await store.get(key)
            if kv is None:
                ok, rev = await self._cas([(key, local.encode(), 0)])
                if ok:
                    self._published([(rel, local, fs)], rev)
                    return
                continue
            try:
                remote = decode(kv.value)
            except ManifestError:
                remote = Manifest(kind="deleted", origin="?")
            if local.content_equal(remote):
                # Same content reached from both sides: adopt the published one.
                self.state.put_files([_record(self.name, rel, remote, fs, kv.mod_revision)])
                if not local.attrs_equal(remote) and remote.kind != "deleted":
                    await asyncio.to_thread(localfs.set_attrs, self.root, rel, remote)
                return
            metrics.conflicts.labels(self.mode).inc()
            self.status.conflicts += 1
            stamp = datetime.now(UTC)
            if self._local_wins(local, remote):
                ops = []
                copy = ""
                # Even when we could not fetch the remote version yet (its origin may be away), its copy is
                # published: it becomes whole as soon as a holder of its chunks is back, and no write is lost.
                if self.keep_copies and remote.kind == "file" and local.kind != "deleted":
                    # The loser's content is kept under a conflict name, published in the same
                    # transaction and before the overwrite: a node that holds only the losing version
                    # sees both in one batch and builds the copy from its local file before replacing it.
                    copy = conflict_name(rel, stamp, remote.origin or "unknown", self._name_taken)
                    remote.ts = time.time()
                    ops.append((store.file_key(self.name, copy), remote.encode(), 0))
                ops.append((key, local.encode(), kv.mod_revision))
                ok, rev = await self._cas(ops)
                if not ok:
                    continue
                self._published([(rel, local, fs)], rev)
                if copy:
                    self._record_conflict(rel, copy, self.ctx.node_id, remote.origin)
                return
            # The remote version wins: move our content aside (no copy), then take theirs.
            moved = False
            if local.kind == "file" and (self.keep_copies or self.mode == "manual"):
                copy, _ = await asyncio.to_thread(localfs.rename_local, self.root, rel,
                                                  conflict_name(rel, stamp, self.ctx.node_id, self._name_taken),
                                                  False, self._free_copy_name(rel, stamp))
                moved = True
                self.dirty.add(copy)
                self.kick.set()
                self._record_conflict(rel, copy, remote.origin, self.ctx.node_id)
            self.state.delete_files(self.name, [rel])
            # Once our content is moved aside the path must be taken as found: a container may have
            # written it again in the meantime, and that write is settled like any other (never
            # overwritten). Without a copy (keep_conflict_copies=false) the local version is replaced.
            await self._apply([_Pending(rel, remote, kv.mod_revision)], resolving=not moved)
            return
        # A path rewritten faster than a compare-and-swap round trip: nothing is lost by waiting, the
        # local content stays on disk and differs from the index, so it is published again shortly.
        log.warning("volume %s: conflict on %s not settled after 10 rounds (hot file); retrying", self.name, rel)
        self.dirty.add(rel)
        asyncio.get_running_loop().call_later(0.2, self.kick.set)

    def _free_copy_name(self, rel: str, stamp: datetime) -> Callable[[], str]:
        """The next conflict-copy name for `rel` when the one chosen was taken meanwhile. Called in a
        worker thread, so the disk (not the index) says which names are free."""
        return lambda: conflict_name(rel, stamp, self.ctx.node_id,
                                     lambda n: os.path.lexists(os.path.join(self.root, n)))

    def _name_taken(self, rel: str) -> bool:
        """A conflict copy name already used here (on disk or in the index): never reused."""
        rec = self.state.file(self.name, rel)
        return (rec is not None and rec.kind != "deleted") or os.path.lexists(os.path.join(self.root, rel))

    def _record_conflict(self, rel: str, copy: str, winner: str, loser: str) -> None:
        self.state.add_conflict(self.name, rel, copy, self.mode, winner, loser, time.time())
        log.info("volume %s: conflict on %s (%s): %s kept, %s's version saved as %s", self.name, rel, self.mode,
                 winner, loser, copy)
        self.ctx.emit("conflict", {"volume": self.name, "path": rel, "copy": copy, "mode": self.mode,
                                   "winner": winner, "loser": loser})

    # ---- applying remote changes
    def _not_applied(self, items: list[_Pending], resolving: bool = False) -> list[_Pending]:
        """The latest version of each path, minus those the index already has (our own publishes
        coming back through the watch, or applied before). Cheap and lock-free, so the watch is read
        at etcd's pace even while a big publish holds the lock."""
        latest: dict[str, _Pending] = {}
        for it in items:
            cur = latest.get(it.rel)
            if cur is None or it.rev > cur.rev:
                latest[it.rel] = it
            old = self.deferred.get(it.rel)
            if old is not None and old.rev <= it.rev:
                del self.deferred[it.rel]  # superseded by a newer version of the same path
        todo: list[_Pending] = []
        known = self.state.files_for(self.name, latest)
        for it in latest.values():
            it.rec = known.get(it.rel)
            if it.rec is not None and it.rec.rev >= it.rev and not resolving:
                continue  # our own publish, or already applied
            todo.append(it)
        return todo

    async def _apply(self, items: list[_Pending], resolving: bool = False) -> None:
        """Bring the local replica to the given manifests (called with the lock held)."""
        todo = self._not_applied(items, resolving)
        if not todo:
            return
        stats = await asyncio.to_thread(lambda: [localfs.lstat(self.root, it.rel) for it in todo])
        clean: list[_Pending] = []
        for it, fs in zip(todo, stats, strict=True):
            it.fs = fs
            rec = it.rec
            locally_changed = (fs is not None and (rec is None or differs(rec, fs))) or (
                fs is None and rec is not None and rec.kind != "deleted")
            if locally_changed and not resolving:
                await self._local_vs_remote(it)
            else:
                clean.append(it)
        if not clean:
            return
        was_absent = {i.rel for i in clean if i.rec is None or i.rec.kind == "deleted"}
        # Parents first; deletions deepest first and after everything else.
        clean.sort(key=lambda i: (i.m.kind == "deleted", -_depth(i.rel) if i.m.kind == "deleted" else _depth(i.rel)))
        dirs = [i for i in clean if i.m.kind == "dir"]
        files = [i for i in clean if i.m.kind in ("file", "symlink")]
        deletes = [i for i in clean if i.m.kind == "deleted"]
        # Worker threads touch the disk only; the index is written here, on the loop's connection.
        if dirs:
            self.state.put_files(await asyncio.to_thread(self._apply_dirs, dirs))
        if files:
            await self._apply_files(files)
        if deletes:
            self.state.put_files(await asyncio.to_thread(self._apply_deletes, deletes))
        done = [i for i in clean if i.rec is not None and i.rec.rev == i.rev]
        if done:
            # Paths a peer created count as created within the guard's window (a queue consumed here).
            self.guard.arrived(((Entry(i.rel, i.m.kind, digest=i.m.digest, size=i.m.size), i.rel in was_absent)
                                for i in done if i.m.kind != "deleted"), time.monotonic())
            self.guard.forget(i.rel for i in done if i.m.kind == "deleted")
            now = time.time()
            for i in done:
                metrics.ops_applied.labels(i.m.kind).inc()
                if i.m.kind == "deleted":
                    self.tombstones_seen += 1
                if i.m.inline:
                    metrics.bytes_inline.inc(len(i.m.inline))
                if i.m.ts > 0:
                    metrics.propagation_lag_seconds.observe(max(0.0, now - i.m.ts))
                    self.status.lag_seconds = max(0.0, now - i.m.ts)
            self.status.applied += len(done)
            self.status.last_applied_at = now
            self.ctx.emit("applied", {"volume": self.name, "count": len(done),
                                      "paths": [i.rel for i in done[:20]]})

    async def _local_vs_remote(self, it: _Pending) -> None:
        """A remote change arrived for a path with an unpublished local edit: settle it through etcd."""
        if it.fs is None:
            local = Manifest(kind="deleted", origin=self.ctx.node_id, ts=time.time())
        else:
            desc = await asyncio.to_thread(localfs.describe, self.root, it.rel, it.fs, self.ctx.node_id, time.time())
            if desc is None:  # still being written: its close will publish it, then the CAS decides
                self.dirty.add(it.rel)
                self.kick.set()
                return
            local = desc
        if local.content_equal(it.m):
            self.state.put_files([_record(self.name, it.rel, it.m, it.fs, it.rev)])
            if it.m.kind != "deleted" and not local.attrs_equal(it.m):
                await asyncio.to_thread(localfs.set_attrs, self.root, it.rel, it.m)
            return
        await self._conflict(it.rel, local, it.fs)

    def _apply_dirs(self, dirs: list[_Pending]) -> list[FileRecord]:
        recs = []
        for it in dirs:
            try:
                fs = localfs.make_dir(self.root, it.rel, it.m)
            except (OSError, PathError) as exc:
                self._reject(it, exc)
                continue
            it.rec = _record(self.name, it.rel, it.m, fs, it.rev)
            recs.append(it.rec)
        return recs

    def _apply_deletes(self, deletes: list[_Pending]) -> list[FileRecord]:
        recs = []
        for it in deletes:
            try:
                removed = localfs.remove(self.root, it.rel)
            except (OSError, PathError) as exc:
                self._reject(it, exc)
                continue
            if not removed:
                # A directory deleted elsewhere still holds local content: modify beats delete.
                self._on_loop(self.dirty.add, it.rel)
            it.rec = _record(self.name, it.rel, it.m, None, it.rev)
            recs.append(it.rec)
        self._on_loop(self.kick.set)
        return recs

    def _reject(self, it: _Pending, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            # Disk full, quota, read-only remount: nothing wrong with the change; retry it later.
            self._defer(it, exc)
            return
        metrics.rejected_input.labels("apply").inc()
        log.warning("volume %s: cannot apply %s (revision %d): %s", self.name, it.rel, it.rev, exc)

    def _locations(self, ids: set[str]) -> dict[str, list[tuple[str, str, int, int]]]:
        return {cid: self.state.chunk_locations(cid) for cid in ids}

    def _read_local(self, cid: str, length: int, locs: dict[str, list[tuple[str, str, int, int]]]) -> bytes | None:
        for vol, path, off, ln in locs.get(cid, ()):
            if ln != length:
                continue
            base = os.path.join(self.ctx.data_root, "volumes", vol)
            if path.startswith(BLOB_PREFIX):
                data = localfs.read_blob_range(base, path[len(BLOB_PREFIX):], off, ln)
            else:
                data = localfs.read_range(os.path.join(base, "_data"), path, off, ln)
            if data is not None and chunker.verify(data, cid):
                return data
        return None

    async def _apply_files(self, files: list[_Pending]) -> None:
        # New paths first (conflict copies, rename targets): their chunks may live in files that the
        # same batch is about to overwrite.
        for it in [it for it in files if it.m.blob and not it.m.chunks]:
            try:
                await self._resolve_blob(it)
            except FetchError as exc:
                self._defer(it, exc)
            except ManifestError as exc:
                metrics.rejected_input.labels("etcd").inc()
                self._reject(it, exc)
        files = [it for it in files if not (it.m.blob and not it.m.chunks)]
        new = [it for it in files if it.rec is None or it.rec.kind == "deleted"]
        if new and len(new) < len(files):
            await self._apply_files(new)
            files = [it for it in files if not (it.rec is None or it.rec.kind == "deleted")]
        small: list[_Pending] = []
        for it in files:
            rec, m = it.rec, it.m
            # Attribute-only change: same content already here.
            if (m.kind == "file" and rec is not None and rec.kind == "file" and rec.digest == m.digest
                    and it.fs is not None and not differs(rec, it.fs)):
                try:
                    fs = await asyncio.to_thread(localfs.set_attrs, self.root, it.rel, m)
                except (OSError, PathError) as exc:
                    self._reject(it, exc)
                    continue
                it.rec = _record(self.name, it.rel, m, fs, it.rev)
                self.state.put_files([it.rec])
                continue
            if m.kind == "file" and m.renamed_from and await self._try_local_rename(it):
                continue
            if m.kind == "file" and m.size > STREAM_THRESHOLD:
                try:
                    await self._apply_large(it)
                except FetchError as exc:
                    self._defer(it, exc)
            else:
                small.append(it)
        # Waves bounded in memory: all chunks a wave lacks are fetched in one batched call.
        wave: list[_Pending] = []
        size = 0
        for it in small:
            wave.append(it)
            size += it.m.size if it.m.inline is None else 0
            if size >= WAVE_BYTES or len(wave) >= APPLY_PAGE:
                await self._apply_wave(wave)
                wave, size = [], 0
        if wave:
            await self._apply_wave(wave)

    async def _try_local_rename(self, it: _Pending) -> bool:
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
            self._reject(it, exc)
            return False
        self.state.delete_files(self.name, [src])
        it.rec = _record(self.name, it.rel, it.m, fs, it.rev)
        self.state.put_files([it.rec])
        return True

    async def _gather(self, wave: list[_Pending], origin_hint: str,
                      lacking_out: set[str] | None = None) -> tuple[dict[str, bytes], dict[str, list]]:
        """Chunks for a wave: found locally (verified) or fetched from peers (verified by the client).
        Chunks no peer could serve raise FetchError, or with `lacking_out` are added to it."""
        need: dict[str, int] = {}
        for it in wave:
            if it.m.kind == "file" and it.m.inline is None:
                for cid, length in it.m.chunks:
                    need[cid] = length
        locs = self._locations(set(need))
        local_hits = await asyncio.to_thread(
            lambda: {cid: d for cid, ln in need.items() if (d := self._read_local(cid, ln, locs)) is not None})
        missing = [cid for cid in need if cid not in local_hits]
        got: dict[str, bytes] = dict(local_hits)
        metrics.bytes_reused.inc(sum(len(d) for d in local_hits.values()))
        if missing:
            t0 = time.monotonic()
            peers = await self.ctx.peers(self.name, origin_hint, False)
            fetched = await self._fetch_unlocked(missing, peers) if peers else {}
            metrics.chunk_fetch_seconds.observe(time.monotonic() - t0)
            got.update(fetched)
            lacking = [cid for cid in missing if cid not in fetched]
            if lacking and lacking_out is not None:
                lacking_out.update(lacking)
            elif lacking:
                raise FetchError(f"{len(lacking)} chunk(s) of volume {self.name} not available from any peer "
                                 f"({', '.join(peers) or 'no peers'})")
        return got, locs

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn on the event loop: worker threads must not touch sets and dicts the loop iterates.
        (Scheduled before the thread's own result, so it has run when the awaiting code resumes.)"""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    async def _fetch_unlocked(self, ids: list[str], peers: list[str]) -> dict[str, bytes]:
        """Fetch chunks without holding the volume lock: a slow or frozen peer must not stop this
        node from publishing its own changes or applying others meanwhile. Safe because nothing is
        renamed into place before `_commit` re-checks the target against what it saw before."""
        held = self.lock.locked()
        if held:
            self.lock.release()
        try:
            return await self.ctx.fetch(self.name, ids, peers)
        finally:
            if held:
                await self.lock.acquire()

    def _defer(self, it: _Pending, exc: BaseException) -> None:
        if threading.get_ident() != self._loop_thread:
            self._on_loop(self._defer, it, exc)
            return
        cur = self.deferred.get(it.rel)
        if cur is not None and cur.rev > it.rev:
            return  # a newer version of the path already waits; the older one must not replace it
        if _superseded(it, self.state.file(self.name, it.rel)):
            return
        if cur is None:
            log.warning("volume %s: %s deferred: %s", self.name, it.rel, exc)
        self.deferred[it.rel] = it

    async def _apply_wave(self, wave: list[_Pending]) -> None:
        origins = [it.m.origin for it in wave if it.m.inline is None and it.m.kind == "file"]
        lacking: set[str] = set()
        got, _ = await self._gather(wave, origins[0] if origins else "", lacking)
        if lacking:
            # One round of fetches per wave: files whose chunks no peer could serve wait (deferred),
            # everything else in the wave (inline files, chunks found) is applied now.
            exc = FetchError(f"{len(lacking)} chunk(s) of volume {self.name} not available from any peer")
            ready = []
            for it in wave:
                if it.m.kind == "file" and it.m.inline is None and any(c in lacking for c, _ in it.m.chunks):
                    self._defer(it, exc)
                else:
                    ready.append(it)
            wave = ready

        def write() -> list[tuple[_Pending, int, str]]:
            staged = []
            for it in wave:
                try:
                    dfd, tmp = localfs.stage(self.root, it.rel, it.m, lambda cid, ln: got[cid])
                except (OSError, PathError) as exc:
                    self._reject(it, exc)
                    continue
                staged.append((it, dfd, tmp))
            if staged:
                localfs.syncfs(self.root)
            return staged

        staged = await asyncio.to_thread(write)
        await self._commit(staged)

    async def _commit(self, staged: list[tuple[_Pending, int, str]]) -> None:
        """Move staged files into place unless the target changed locally meanwhile (the fetch ran
        without the lock): those go through the conflict path. The check happens in `localfs.commit`,
        right before each rename, so a write racing with the swap is not lost (see there)."""
        ready = []
        now = self.state.files_for(self.name, [it.rel for it, _, _ in staged])  # one query per wave
        for it, dfd, tmp in staged:
            if _superseded(it, now.get(it.rel)):
                await asyncio.to_thread(localfs.discard, dfd, tmp)
            else:
                ready.append((it, dfd, tmp))
        raced: list[tuple[_Pending, FileStat | None]] = []
        displaced: list[tuple[_Pending, int]] = []

        def rename_all() -> list[FileRecord]:
            recs = []
            for it, dfd, tmp in ready:
                try:
                    fs, old_fd = localfs.commit(dfd, tmp, it.rel, it.fs)
                except localfs.TargetChanged as exc:
                    raced.append((it, exc.now))
                    continue
                except OSError as exc:
                    self._reject(it, exc)
                    continue
                if old_fd >= 0:
                    displaced.append((it, old_fd))
                it.rec = _record(self.name, it.rel, it.m, fs, it.rev)
                recs.append(it.rec)
            return recs

        self.state.put_files(await asyncio.to_thread(rename_all))
        for it, old_fd in displaced:
            self._keep_displaced(it, old_fd)
        for it, now in raced:
            it.fs = now
            await self._local_vs_remote(it)

    def _keep_displaced(self, it: _Pending, fd: int) -> None:
        """A local write landed in the file while the remote version replaced it: keep that content
        as a conflict copy (the remote version keeps the name; nothing the container wrote is lost)."""
        stamp = datetime.now(UTC)
        copy = conflict_name(it.rel, stamp, self.ctx.node_id, self._name_taken)

        async def save() -> None:
            try:
                kept, _ = await asyncio.to_thread(localfs.save_displaced, self.root, copy, fd,
                                                  next_name=self._free_copy_name(it.rel, stamp))
            except (OSError, PathError) as exc:
                log.error("volume %s: could not keep the local write to %s that raced with a remote version: %s",
                          self.name, it.rel, exc)
                return
            self.dirty.add(kept)
            self.kick.set()
            self._record_conflict(it.rel, kept, it.m.origin, self.ctx.node_id)

        task = asyncio.get_running_loop().create_task(save(), name=f"keep-{self.name}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _apply_large(self, it: _Pending) -> None:
        """Stream a big file in waves of chunks, written at their offsets in a temp file.

        To keep the origin's upload from growing with the number of nodes, every node starts at a
        different wave (a hash of its id), asks a few other holders before the origin, and serves the
        chunks it has already written to its temp file to the others while it is still applying."""
        locs_all = self._locations({cid for cid, _ in it.m.chunks})
        m = it.m
        dfd, tmp = await asyncio.to_thread(localfs.stage, self.root, it.rel,
                                           Manifest(kind="file", mode=0o600, mtime_ns=m.mtime_ns), lambda c, n: b"")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            await asyncio.to_thread(localfs.discard, dfd, tmp)
            raise
        shared = _PartialFile(fd)
        waves = list(_waves(_with_offsets(m.chunks), LARGE_WAVE_BYTES))
        start = int(chunker.chunk_id(f"{self.ctx.node_id}/{m.digest}".encode())[:8], 16) % max(1, len(waves))
        writing: asyncio.Future[None] | None = None
        try:
            peers: list[str] | None = None

            def write(group: list[tuple[str, int, int]], data: dict[str, bytes]) -> None:
                for cid, off, _ in group:
                    view = memoryview(data[cid])
                    while view:
                        n = os.pwrite(fd, view, off)
                        view, off = view[n:], off + n
                lo = min(off for _, off, _ in group)
                localfs.start_writeback(fd, lo, max(off + ln for _, off, ln in group) - lo)

            def published(group: list[tuple[str, int, int]]) -> None:
                for cid, off, ln in group:
                    self.partial.setdefault(cid, (shared, off, ln))

            for group in waves[start:] + waves[:start]:
                ids = {cid: ln for cid, _, ln in group}
                local = await asyncio.to_thread(
                    lambda ids=ids: {c: d for c, n in ids.items() if (d := self._read_local(c, n, locs_all))})
                missing = [c for c in ids if c not in local]
                data = dict(local)
                metrics.bytes_reused.inc(sum(len(d) for d in local.values()))
                if missing:
                    if peers is None:
                        peers = await self.ctx.peers(self.name, m.origin, True)
                    t0 = time.monotonic()
                    fetched = await self._fetch_unlocked(missing, peers) if peers else {}
                    metrics.chunk_fetch_seconds.observe(time.monotonic() - t0)
                    if len(fetched) < len(missing):
                        raise FetchError(f"{len(missing) - len(fetched)} chunk(s) of {it.rel} not available")
                    data.update(fetched)
                # Pipeline: this wave is written while the next one is fetched.
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(write, group, data))
                writing.add_done_callback(lambda f, g=group: published(g) if not f.exception() else None)
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
            self._unshare(shared)
            await shared.close()
            await asyncio.to_thread(localfs.discard, dfd, tmp)
            raise
        self._unshare(shared)
        await shared.close()
        await self._commit([(it, dfd, tmp)])

    def _unshare(self, shared: _PartialFile) -> None:
        for cid in [c for c, (f, _, _) in self.partial.items() if f is shared]:
            del self.partial[cid]

    # ---- chunk serving and status
    async def read_chunk(self, chunk_id: str) -> bytes | None:
        part = self.partial.get(chunk_id)
        if part is not None:  # a big file still being applied here: serve what is already written
            shared, off, ln = part
            data = await shared.read(off, ln)
            if data is not None and chunker.verify(data, chunk_id):
                return data
        locs = [loc for loc in self.state.chunk_locations(chunk_id) if loc[0] == self.name]
        if not locs:
            return None
        return await asyncio.to_thread(self._read_local, chunk_id, locs[0][3], {chunk_id: locs})

    def describe_status(self) -> dict[str, Any]:
        st = self.state.volume_stats(self.name)
        w = self.watcher
        return {
            "ready": self.ready.is_set(), "revision": self.state.revision(self.name), "files": st["files"],
            "bytes": st["bytes"], "pending": len(self.dirty), "published": self.status.published,
            "applied": self.status.applied, "conflicts": self.status.conflicts,
            "lag_seconds": round(self.status.lag_seconds, 4), "last_error": self.status.last_error,
            "watches": w.watch_count if w else 0, "watcher_degraded": bool(w and w.degraded),
            "watcher_reason": (w.degraded_reason or "") if w else "",
            "paused": self.paused, "deferred": len(self.deferred), **self.guard.describe(),
        }

    async def resync(self, path: str | None = None) -> dict[str, Any]:
        """Operator request (POST .../sync): re-hash and republish local changes; re-fetch a path whose
        local content no longer matches its manifest (e.g. damaged on disk without a visible change).

        Without a path: a full rescan of the volume. Returns what was done."""
        if path is None:
            self.rescan_needed.set()
            self.kick.set()
            return {"volume": self.name, "action": "rescan"}
        rel = validate_relpath(path)
        kv = await self.store.get(self.store.file_key(self.name, rel))
        remote = decode(kv.value) if kv is not None else None
        async with self.lock:
            rec = self.state.file(self.name, rel)
            fs = await asyncio.to_thread(localfs.lstat, self.root, rel)
            changed = (fs is not None and (rec is None or differs(rec, fs))) or (
                fs is None and rec is not None and rec.kind != "deleted")
            if changed or (remote is None and fs is not None):
                self.dirty.add(rel)
                self.kick.set()
                return {"volume": self.name, "path": rel, "action": "republish"}
            if remote is None:
                return {"volume": self.name, "path": rel, "action": "none", "reason": "unknown path"}
            it = _Pending(rel, remote, kv.mod_revision, fs=fs)
            if rec is None or rec.rev < kv.mod_revision:
                await self._apply([it])
                return {"volume": self.name, "path": rel, "action": "apply", "revision": kv.mod_revision}
            if remote.kind == "file" and fs is not None:
                local = await asyncio.to_thread(localfs.describe, self.root, rel, fs, self.ctx.node_id, time.time())
                if local is not None and not local.content_equal(remote):
                    # The index agrees with stat but not with the bytes: fetch the published version again
                    # (local chunks are verified before reuse, so damaged ones come from peers).
                    await self._apply_files([it])
                    return {"volume": self.name, "path": rel, "action": "refetch", "revision": kv.mod_revision,
                            "deferred": rel in self.deferred}
            return {"volume": self.name, "path": rel, "action": "none", "reason": "in sync"}


class Engine:
    """All volumes this node holds."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.volumes: dict[str, VolumeSync] = {}

    async def attach(self, name: str, options: VolumeOptions) -> VolumeSync:
        vs = self.volumes.get(name)
        if vs is None:
            vs = VolumeSync(self.ctx, name, options)
            self.volumes[name] = vs
            await vs.start()
            metrics.volumes_held.set(len(self.volumes))
        return vs

    def retry_deferred_now(self) -> None:
        for vs in self.volumes.values():
            if vs.deferred:
                vs.retry_now.set()

    async def wait_ready(self, name: str, timeout: float) -> bool:
        vs = self.volumes.get(name)
        if vs is None:
            return False
        try:
            await asyncio.wait_for(vs.ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def detach(self, name: str, delete_data: bool) -> None:
        vs = self.volumes.pop(name, None)
        if vs is not None:
            await vs.stop()
        metrics.volumes_held.set(len(self.volumes))
        if delete_data:
            self.ctx.state.unhold(name)
            base = os.path.join(self.ctx.data_root, "volumes", name)
            await asyncio.to_thread(shutil.rmtree, base, True)

    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        vs = self.volumes.get(volume)
        return await vs.read_chunk(chunk_id) if vs else None

    async def close(self) -> None:
        for name in list(self.volumes):
            vs = self.volumes.pop(name)
            await vs.stop()
