"""The per-volume object: the state its stages share, their lifecycle, the guards' pause, and a status snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import chunker, localfs, metrics
from ..ignore import IgnoreMatcher
from ..manifest import ManifestError, decode
from ..meta import EtcdStore, EtcdUnavailable
from ..pathsafe import is_internal_name, validate_relpath
from ..volopts import VolumeOptions
from ..watcher import VolumeWatcher
from .apply import Applier
from .commit import Committer, PartialFile
from .conflict import Conflicts
from .context import EngineContext
from .decide import depth, differs, locally_changed
from .fetch import Fetcher
from .follow import Follower
from .guard import DeleteGuard
from .pending import Pending, record_of
from .publish import Publisher
from .roles import Role, effective_role, parse_role
from .scan import Scanner
from .versions import Version, to_drop

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
        self.versions_dir = os.path.join(self.base, "versions")  # outside _data: never seen, never synced
        self.versions_added = False
        self.pruning = False
        # The stages, in the order a change flows through them (see the package docstring).
        self.scanner = Scanner(self)
        self.publisher = Publisher(self)
        self.conflicts = Conflicts(self)
        self.follower = Follower(self)
        self.applier = Applier(self)
        self.fetcher = Fetcher(self)
        self.committer = Committer(self)

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
                       asyncio.create_task(self.versions_loop(), name=f"versions-{self.name}")]
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

    # ---- versions kept for undo (sync/versions.py)
    def version_slot(self) -> tuple[str, str]:
        """A new version's id and where its file goes; ("", "") with versioning off. Worker threads."""
        if self.options.versioning == "off":
            return "", ""
        os.makedirs(self.versions_dir, mode=0o700, exist_ok=True)
        vid = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        return vid, os.path.join(self.versions_dir, vid)

    def versions_kept(self, kept: list[Version]) -> None:
        self.state.add_versions(self.name, kept)
        self.versions_added = True
        if self.options.versioning_max_bytes and not self.pruning:
            # Over its cap the store is trimmed now, not at the next round.
            self.pruning = True
            asyncio.get_running_loop().create_task(self.prune_versions())

    async def prune_versions(self) -> int:
        """Enforce the volume's retention and byte cap on this node's version store."""
        try:
            o = self.options
            drop = to_drop(self.state.versions(self.name), o.versioning, o.versions_keep, o.versioning_retention,
                           o.versioning_max_bytes, time.time())
            if drop:

                def unlink_all() -> None:
                    for v in drop:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.versions_dir, v))

                await asyncio.to_thread(unlink_all)
                self.state.delete_versions(self.name, drop)
            n, size = self.state.version_stats(self.name)
            metrics.versions_files.labels(self.name).set(n)
            metrics.versions_bytes.labels(self.name).set(size)
            return len(drop)
        finally:
            self.pruning = False

    async def versions_loop(self) -> None:
        """Retention is enforced every minute (and at once when a byte cap is crossed)."""
        while True:
            try:
                await self.prune_versions()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again
                log.exception("volume %s: pruning kept versions failed", self.name)
            await asyncio.sleep(60.0)

    async def restore(self, ids: Sequence[str], to: str = "") -> dict[str, Any]:
        """Write kept versions back into the volume as new local changes: published like any write, so
        every node converges on them. `to`: another path (one version only)."""
        if to and len(ids) != 1:
            raise ValueError("--to restores one version at a time")
        have = {v.id: v for v in self.state.versions(self.name)}
        missing = [i for i in ids if i not in have]
        if missing:
            raise KeyError(f"no kept version {missing[0]} of volume {self.name} on this node")
        target = validate_relpath(to) if to else ""
        restored: list[dict[str, Any]] = []
        for vid in ids:
            v = have[vid]
            rel = target or v.path
            await asyncio.to_thread(localfs.restore_copy, self.root, rel, os.path.join(self.versions_dir, vid))
            self.dirty.add(rel)
            restored.append({"id": vid, "path": rel, "from": v.path, "at": v.at, "size": v.size})
        self.kick.set()
        log.warning("volume %s: %d kept version(s) restored (%s)", self.name, len(restored),
                    ", ".join(r["path"] for r in restored[:5]), extra={"volume": self.name})
        return {"volume": self.name, "node": self.ctx.node_id, "restored": restored}

    @property
    def role(self) -> Role:
        return effective_role(self.ctx.node_id, self.options.writers, self.role_override)

    def set_role(self, role: Role | None) -> None:
        """An operator's role for this node's replica (None: whatever the volume's `writers` says)."""
        self.role_override = role
        self.state.set_meta(f"role:{self.name}", role.value if role else "")
        log.info("volume %s: this node's replica is now %s", self.name, self.role, extra={"volume": self.name})
        self.scanner.rescan_soon()  # what changed meanwhile is published, or kept as local changes

    def note_local_changes(self, changed: set[str], unchanged: set[str]) -> None:
        """A receive-only replica's edits: kept, shown, warned about once a minute (never per file)."""
        self.local_changes |= changed
        self.local_changes -= unchanged
        metrics.local_changes.labels(self.name).set(len(self.local_changes))
        if changed and time.monotonic() - self.local_warned_at >= 60:
            self.local_warned_at = time.monotonic()
            log.warning("volume %s: %d local change(s) on a receive-only replica are kept here and not published "
                        "(e.g. %s); `syncmesh-plugin revert %s` takes the cluster's version back", self.name,
                        len(self.local_changes), sorted(self.local_changes)[0], self.name, extra={"volume": self.name})

    async def revert(self, path: str | None = None) -> dict[str, Any]:
        """Syncthing's "Revert Local Changes": local additions go, the cluster's version of what was
        changed or deleted here comes back."""
        if path is None:
            await self.scanner.rescan("revert")  # the local changes as the disk has them now
        async with self.lock:
            todo = set(self.local_changes) if path is None else {validate_relpath(path)}
            recs = self.state.files_for(self.name, todo)
            added = sorted((p for p in todo if (r := recs.get(p)) is None or r.kind == "deleted"), key=depth,
                           reverse=True)
            removed = await asyncio.to_thread(lambda: [p for p in added if localfs.remove(self.root, p)])
            back: list[Pending] = []
            for p in sorted(todo - set(added)):
                kv = await self.store.get_file(self.name, p)
                if kv is not None:
                    back.append(Pending(p, decode(kv.value), kv.mod_revision))
            if back:
                await self.applier.apply(back, resolving=True)
            self.note_local_changes(set(), todo)
        log.warning("volume %s: local changes reverted: %d addition(s) removed, %d path(s) taken back from the "
                    "cluster", self.name, len(removed), len(back), extra={"volume": self.name})
        return {"volume": self.name, "removed": len(removed), "restored": len(back)}

    async def override(self) -> dict[str, Any]:
        """Syncthing's "Override Changes": this node's whole state is published over the cluster's. Each
        path etcd has that differs here gets its published revision as the base of a new publish (the
        path itself, or a tombstone when it is gone here); the mass-deletion guard judges as always."""
        if self.role is Role.RECEIVE_ONLY:
            raise ValueError(f"volume {self.name}: this node's replica is receive-only; it publishes nothing")
        store = self.store
        queued = 0
        async with self.lock:
            _, pages = await store.read_files(self.name, page=2048)
            async for page in pages:
                items = [(store.path_of(self.name, kv.key), kv) for kv in page]
                stats = await asyncio.to_thread(lambda rels: {rel: localfs.lstat(self.root, rel) for rel in rels},
                                                [rel for rel, _ in items])
                recs = self.state.files_for(self.name, [rel for rel, _ in items])
                adopt = []
                for rel, kv in items:
                    try:
                        remote = decode(kv.value)
                    except ManifestError:
                        continue
                    fs, rec = stats[rel], recs.get(rel)
                    same = (fs is not None and rec is not None and not differs(rec, fs) and rec.kind == remote.kind
                            and rec.digest == remote.digest and rec.target == remote.target)
                    if same or (fs is None and remote.kind == "deleted"):
                        if rec is not None:
                            adopt.append(replace(rec, rev=kv.mod_revision))
                        continue
                    # The base of our publish is what etcd holds now; inode 0 makes the path differ.
                    adopt.append(record_of(self.name, rel, remote, None, kv.mod_revision))
                    self.dirty.add(rel)
                    queued += 1
                self.state.put_files(adopt)
            self.remote_ignored.clear()
        self.scanner.rescan_soon()  # and whatever exists only here
        log.warning("volume %s: overriding the cluster with this node's state (%d path(s) differ)", self.name, queued,
                    extra={"volume": self.name})
        return {"volume": self.name, "queued": queued}

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
            "local_changes_sample": sorted(self.local_changes)[:20], "remote_ignored": len(self.remote_ignored),
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
