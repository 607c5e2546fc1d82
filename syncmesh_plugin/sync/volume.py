"""The per-volume object: the state its stages share, their lifecycle, the guards' pause, and a status snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import chunker, localfs, metrics
from ..ignore import IgnoreMatcher
from ..manifest import decode
from ..meta import EtcdStore, EtcdUnavailable
from ..pathsafe import is_internal_name, validate_relpath
from ..volopts import VolumeOptions
from ..watcher import VolumeWatcher
from .apply import Applier
from .commit import Committer, PartialFile
from .conflict import Conflicts
from .context import EngineContext
from .decide import locally_changed
from .fetch import Fetcher
from .follow import Follower
from .guard import DeleteGuard
from .keep import Keeper
from .local import LocalChanges
from .pending import Pending
from .publish import Publisher
from .roles import Role, effective_role, parse_role
from .scan import Scanner

log = logging.getLogger(__name__)


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
        self.ready = asyncio.Event()  # caught up with etcd's revision (changes may still be deferred)
        self.complete = asyncio.Event()  # ready, and no change waits for chunks: every byte is here
        self.dirty: set[str] = set()
        self.rescan_needed = asyncio.Event()
        self.kick = asyncio.Event()
        self.watcher: VolumeWatcher | None = None
        self.status = VolumeStatus()
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopping = False
        # Remote changes whose chunks no peer could serve yet: retried, and the stored watch revision
        # never moves past them, so a restart replays them instead of forgetting them.
        self.deferred: dict[str, Pending] = {}
        self.retry_now = asyncio.Event()
        self.tombstones_seen = 0  # deletions published or applied here (housekeeping skips idle volumes)
        self.drained = asyncio.Event()
        self.drained.set()
        # Guards against mass damage. A missing or replaced volume directory stops everything for this
        # volume (nothing on disk can be trusted); a mass deletion holds only the deletions (the guard
        # module). Both wait for an operator (accept the local state, or restore from the cluster).
        self.root_problem = ""
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.guard = DeleteGuard(ctx.mass_delete_threshold, ctx.mass_delete_min_files, ctx.mass_delete_window)
        self.accept_local = False  # the operator accepted the local state: the next rescan publishes it all
        self.partial: dict[str, tuple[PartialFile, int, int]] = {}  # chunks of big files being applied
        self.side_tasks: set[asyncio.Task[None]] = set()  # conflict copies being saved
        # Roles (sync/roles.py): a receive-only replica keeps its local changes to itself; a send-only one
        # counts the remote changes it does not apply.
        self.role_override = parse_role(self.state.get_meta(f"role:{name}") or "")
        self.local_changes: set[str] = set()
        self.local_warned_at = 0.0
        self.remote_ignored: dict[str, int] = {}
        # The stages, in the order a change flows through them (see the package docstring).
        self.scanner = Scanner(self)
        self.publisher = Publisher(self)
        self.conflicts = Conflicts(self)
        self.follower = Follower(self)
        self.applier = Applier(self)
        self.fetcher = Fetcher(self)
        self.committer = Committer(self)
        self.keeper = Keeper(self)  # versions kept for undo
        self.local = LocalChanges(self)  # a receive-only replica's local changes

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.started_ns = time.time_ns()  # temp files older than this belong to a previous daemon
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        self.state.hold(self.name)
        known = self.state.get_meta(f"root:{self.name}")
        if known is None or known.count(":") == 1:  # none yet, or recorded before the mark existed
            self.remember_root()
        if self.state.revision(self.name) > 0:
            self.scanner.start_watcher()
        # else: a first attach. The watcher starts after the initial copy (see _reconcile): our own
        # writes of a million files would only come back as a million events to filter, and the
        # rescan that ends the reconcile finds anything written locally meanwhile.
        self._tasks = [asyncio.create_task(self.follower.run(), name=f"sync-{self.name}"),
                       asyncio.create_task(self.publisher.run(), name=f"publish-{self.name}"),
                       asyncio.create_task(self.scanner.run(), name=f"rescan-{self.name}"),
                       asyncio.create_task(self.follower.retry_loop(), name=f"retry-{self.name}"),
                       asyncio.create_task(self.keeper.versions_loop(), name=f"versions-{self.name}")]
        for t in self._tasks:
            t.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """These loops run for the volume's lifetime: one ending on its own is a bug to see at once."""
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        self.status.last_error = f"{task.get_name()} stopped: {exc!r}"
        log.error("volume %s: %s stopped unexpectedly: %r", self.name, task.get_name(), exc, exc_info=exc)

    async def stop(self) -> None:
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        if self.side_tasks:  # conflict copies being saved: let them finish
            await asyncio.wait(set(self.side_tasks), timeout=6)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

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

    def remember_root(self) -> None:
        with contextlib.suppress(OSError):  # file systems without xattrs: device and inode only
            os.setxattr(self.root, self._XATTR, uuid.uuid4().hex.encode())
        self.state.set_meta(f"root:{self.name}", self._root_id())

    def check_root(self) -> str:
        """A vanished or replaced volume directory (an unmounted disk, a restored backup) must not be
        published as "every file deleted"."""
        now = self._root_id()
        if not now:
            return f"the volume directory {self.root} is missing"
        if now != self.state.get_meta(f"root:{self.name}"):
            return f"the volume directory {self.root} was replaced (device/inode changed)"
        return ""

    @property
    def role(self) -> Role:
        return effective_role(self.ctx.node_id, self.options.writers, self.role_override)

    def set_role(self, role: Role | None) -> None:
        """An operator's role for this node's replica (None: whatever the volume's `writers` says)."""
        self.role_override = role
        self.state.set_meta(f"role:{self.name}", role.value if role else "")
        log.info("volume %s: this node's replica is now %s", self.name, self.role, extra={"volume": self.name})
        self.scanner.rescan_soon()  # what changed meanwhile is published, or kept as local changes

    @property
    def paused(self) -> str:
        """Why this volume waits for an operator ("" when it does not)."""
        if self.root_problem:
            return f"{self.root_problem}; nothing syncs until an operator decides"
        return self.guard.paused

    def pause(self, reason: str) -> None:
        """The volume directory cannot be trusted: stop publishing and applying until an operator decides."""
        if not self.root_problem:
            self.announce_pause(f"{reason}; nothing syncs until an operator decides")
        self.root_problem = reason
        self.status.last_error = f"paused: {self.paused}"
        self.unpaused.clear()

    def announce_pause(self, reason: str) -> None:
        log.error("volume %s: paused: %s; run `syncmesh-plugin resume %s` to accept the local state, or "
                  "`syncmesh-plugin resume %s --restore` to take the cluster's", self.name, reason, self.name,
                  self.name, extra={"volume": self.name})
        self.ctx.emit("paused", {"volume": self.name, "reason": reason})
        metrics.volume_paused.labels(self.name).set(1)

    async def resume(self, restore: bool = False) -> None:
        """Operator decision after a pause: accept the local state as the truth (publish it, deletions
        included), or restore: forget the local index and take everything back from the cluster."""
        async with self.lock:
            self.remember_root()
            if restore:
                self.guard.restore()
                self.dirty.clear()
                self.state.delete_files(self.name, [r.path for r in self.state.files(self.name)])
                self.state.set_synced(self.name, False)
                self._tasks[0].cancel()  # leave the watch: the next run starts with a full reconcile
            else:
                self.dirty.update(self.guard.accept(time.monotonic()))
                self.accept_local = True
                self.rescan_needed.set()
            self.root_problem = ""
            self.status.last_error = ""
            self.unpaused.set()
            metrics.volume_paused.labels(self.name).set(0)
        if restore:
            with contextlib.suppress(asyncio.CancelledError):
                await self._tasks[0]
            self._tasks[0] = asyncio.create_task(self.follower.run(), name=f"sync-{self.name}")
        self.kick.set()
        log.warning("volume %s: resumed by the operator (%s)", self.name, "restore" if restore else "accept")

    def ignored(self, rel: str, is_dir: bool = False) -> bool:
        return is_internal_name(rel) or self.matcher.ignored(rel, is_dir)

    @property
    def store(self) -> EtcdStore:
        s = self.ctx.get_store()
        if s is None:
            raise EtcdUnavailable("etcd is not connected")
        return s

    def mark_ready(self) -> None:
        if not self.ready.is_set():
            self.ready.set()
            self.status.ready = True
            self.state.set_synced(self.name, True)
            self.ctx.emit("volume_ready", {"volume": self.name})
        self.check_complete()

    def check_complete(self) -> None:
        """Caught up with etcd and nothing deferred: this node has every byte of the volume (until
        then a first Mount waits, and never starts a container on a partial copy)."""
        if self.ready.is_set() and not self.deferred and not self.complete.is_set():
            self.complete.set()
            self.state.set_meta(f"complete:{self.name}", "1")  # a Mount no longer waits for a first copy

    def on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn on the event loop: worker threads must not touch sets and dicts the loop iterates.
        (Scheduled before the thread's own result, so it has run when the awaiting code resumes.)"""
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

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
        return await asyncio.to_thread(self.fetcher.read_local, chunk_id, locs[0][3], {chunk_id: locs})

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
            "role": self.role.value, "local_changes": len(self.local_changes),
            "local_changes_sample": heapq.nsmallest(20, self.local_changes), "remote_ignored": len(self.remote_ignored),
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
        kv = await self.store.get_file(self.name, rel)
        remote, rev = (decode(kv.value), kv.mod_revision) if kv is not None else (None, 0)
        async with self.lock:
            rec = self.state.file(self.name, rel)
            fs = await asyncio.to_thread(localfs.lstat, self.root, rel)
            changed = locally_changed(rec, fs)
            if changed or (remote is None and fs is not None):
                self.dirty.add(rel)
                self.kick.set()
                return {"volume": self.name, "path": rel, "action": "republish"}
            if remote is None:
                return {"volume": self.name, "path": rel, "action": "none", "reason": "unknown path"}
            it = Pending(rel, remote, rev, fs=fs)
            if rec is None or rec.rev < rev:
                await self.applier.apply([it])
                return {"volume": self.name, "path": rel, "action": "apply", "revision": rev}
            if remote.kind == "file" and fs is not None:
                local = await asyncio.to_thread(localfs.describe, self.root, rel, fs, self.ctx.node_id, time.time())
                if local is not None and not local.content_equal(remote):
                    # The index agrees with stat but not with the bytes: fetch the published version again
                    # (local chunks are verified before reuse, so damaged ones come from peers).
                    await self.applier.apply_files([it])
                    return {"volume": self.name, "path": rel, "action": "refetch", "revision": rev,
                            "deferred": rel in self.deferred}
            return {"volume": self.name, "path": rel, "action": "none", "reason": "in sync"}
