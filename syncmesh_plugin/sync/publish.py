"""Publish stage: dirty paths are described (hashed), judged by the guard and published by compare-and-swap."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING

from .. import chunker, localfs, metrics
from ..localfs import FileStat
from ..manifest import Manifest
from ..meta import MAX_TXN_OPS, EtcdUnavailable
from ..state import FileRecord
from .decide import Local, apply_order, locally_changed, plan_local
from .guard import Entry
from .pending import record_of
from .roles import Role
from .stage import Stage

if TYPE_CHECKING:
    from .volume import VolumeSync

log = logging.getLogger(__name__)

FLUSH_MAX = 1024  # paths hashed and published per round (a slice of inline files is ~20 MB in flight)


class Publisher(Stage):
    """Publishes dirty paths: describe, let the guard hold deletions, compare-and-swap, record."""

    def __init__(self, vol: VolumeSync) -> None:
        super().__init__(vol)
        self._review_at: asyncio.TimerHandle | None = None

    def schedule_review(self) -> None:
        """Wake the publisher when the held burst of deletions is due for its judgement."""
        due = self.vol.guard.due(time.monotonic())
        if due is None or self.vol.guard.paused:
            return  # nothing held, or paused: reviewed on every flush (paths written again lift it)
        if self._review_at is not None:
            self._review_at.cancel()
        self._review_at = asyncio.get_running_loop().call_later(due + 0.005, self.vol.kick.set)

    async def review_guard(self) -> None:
        """Judge a held burst of deletions that has settled: release it, or pause the deletions."""
        if self.vol.guard.due(time.monotonic()) is None:
            return
        held = list(self.vol.guard.held)
        if held:  # paths a peer deleted too, or that are back on disk, are no longer held deletions
            recs = self.state.files_for(self.name, held)
            stats = await asyncio.to_thread(localfs.lstat_many, self.root, held)
            back = {p for p, fs in stats.items() if fs is not None}
            self.vol.guard.forget(p for p in held if p in back or (r := recs.get(p)) is None or r.kind == "deleted")
        review = self.vol.guard.review(time.monotonic(), lambda: self.state.volume_stats(self.name)["files"])
        if review.paused:
            self.vol.announce_pause(review.paused)
            self.vol.status.last_error = f"paused: {review.paused}"
        if review.lifted and not self.vol.root_problem:
            log.warning("volume %s: mass-deletion pause lifted: the held paths were written again or fell "
                        "below the share", self.name)
            self.vol.status.last_error = ""
            metrics.volume_paused.labels(self.name).set(0)
        if review.release:
            self.vol.dirty.update(review.release)
            self.vol.kick.set()
        metrics.held_deletions.labels(self.name).set(len(self.vol.guard.held))
        self.schedule_review()

    async def run(self) -> None:
        while True:
            await self.vol.kick.wait()
            self.vol.kick.clear()
            if self.vol.guard.due(time.monotonic()) is not None:
                try:
                    async with self.vol.lock:
                        await self.review_guard()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the held deletions stay held; the next kick judges them again
                    log.exception("volume %s: reviewing held deletions failed", self.name)
            if not self.vol.dirty and not self.vol.rescan_needed.is_set():
                continue
            if not self.ctx.etcd_ready.is_set() or self.ctx.get_store() is None:
                await asyncio.sleep(0.5)  # changes stay queued (the disk is the durable queue)
                self.vol.kick.set()
                continue
            try:
                if self.vol.rescan_needed.is_set():
                    self.vol.rescan_needed.clear()
                    accepting = self.vol.accept_local
                    await self.vol.scanner.rescan("accept" if accepting else "overflow")
                    if accepting:
                        self.vol.accept_local = False
                else:
                    await self.flush()
            except EtcdUnavailable as exc:
                self.vol.status.last_error = str(exc)
                log.warning("volume %s: publishing paused: %s", self.name, exc)
                await asyncio.sleep(1.0)
                self.vol.kick.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("volume %s: publish failed; will retry", self.name)
                await asyncio.sleep(1.0)
                self.vol.kick.set()

    async def flush(self) -> None:
        """Publish every dirty path: hash what changed, CAS in batched transactions."""
        async with self.vol.lock:
            if not self.vol.dirty or self.vol.root_problem:
                return
            problem = self.vol.check_root()
            if problem:
                self.vol.pause(problem)
                return
            # Bounded slices: a first publish of a million files never holds a million manifests.
            if len(self.vol.dirty) <= FLUSH_MAX:
                paths, self.vol.dirty = self.vol.dirty, set()
            else:
                paths = set(itertools.islice(self.vol.dirty, FLUSH_MAX))
                self.vol.dirty -= paths
                self.vol.kick.set()
            metrics.pending_items.labels(self.name).set(0)
            recs, stats = await self.vol.scanner.expand(paths)
            # Directory-only ignore patterns (`cache/`) need to know what the path is: now we do.
            paths = {p for p, fs in stats.items()
                     if not self.vol.ignored(p, (fs.kind if fs else getattr(recs.get(p), "kind", "")) == "dir")}
            if self.vol.role is Role.RECEIVE_ONLY:
                # Detected as always, kept and shown, never published (see sync/roles.py).
                changed = {p for p in paths if locally_changed(recs.get(p), stats[p])}
                self.vol.local.note(changed, paths - changed)
                return
            now = time.time()
            node = self.ctx.node_id

            def build() -> tuple[list[tuple[str, Manifest, FileStat | None]], set[str]]:
                out: list[tuple[str, Manifest, FileStat | None]] = []
                unstable: set[str] = set()
                gone = {p: r for p, r in recs.items() if stats.get(p) is None and r.kind == "file"}
                by_inode = {(r.inode, r.size, r.mtime_ns): p for p, r in gone.items()}
                for p in sorted(paths):
                    fs, rec = stats[p], recs.get(p)
                    src = by_inode.get((fs.inode, fs.size, fs.mtime_ns)) if fs and fs.kind == "file" else None
                    action = plan_local(rec, fs, gone[src] if src is not None else None, chunker.INLINE_MAX)
                    if action is Local.SKIP:
                        continue  # unchanged, or our own write coming back through inotify
                    if action is Local.DELETE:
                        out.append((p, Manifest(kind="deleted", origin=node, ts=now), None))
                        continue
                    assert fs is not None
                    if action is Local.RENAME:
                        assert src is not None
                        r = gone[src]  # a rename: reuse the content description, no re-hash
                        m = Manifest(kind="file", size=r.size, mode=fs.mode, uid=fs.uid, gid=fs.gid,
                                     mtime_ns=fs.mtime_ns, digest=r.digest, chunks=r.chunks or [], origin=node,
                                     ts=now, renamed_from=src)
                        out.append((p, m, fs))
                        continue
                    described = localfs.describe(self.root, p, fs, node, now)
                    if described is None:
                        unstable.add(p)
                    else:
                        out.append((p, described, fs))
                return out, unstable

            built, unstable = await asyncio.to_thread(build)
            await asyncio.to_thread(self.blobify, built)
            built = self.guarded(built, recs)
            if unstable:
                self.vol.dirty.update(unstable)
                asyncio.get_running_loop().call_later(0.05, self.vol.kick.set)
            # Parents before children, new paths before deletions (a rename's source is still there).
            built.sort(key=lambda t: apply_order(t[1].kind, t[0]))
            try:
                for i in range(0, len(built), MAX_TXN_OPS):
                    await self.publish(built[i:i + MAX_TXN_OPS], recs)
            except EtcdUnavailable:
                self.vol.dirty.update(p for p, _, _ in built)
                raise

    def guarded(self, built: list[tuple[str, Manifest, FileStat | None]], recs: dict[str, FileRecord]
                 ) -> list[tuple[str, Manifest, FileStat | None]]:
        """What of this flush may be published now: everything but the deletions the guard holds
        (see sync.guard). Written paths are told to the guard first, so a rename's old paths in the
        same flush are seen as moved, not lost."""
        now = time.monotonic()
        self.vol.guard.arrived(((Entry(p, m.kind, fs.inode if fs else 0, m.size, fs.mtime_ns if fs else m.mtime_ns,
                                   m.digest), (r := recs.get(p)) is None or r.kind == "deleted")
                            for p, m, fs in built if m.kind != "deleted"), now)
        gone = [Entry(p, r.kind, r.inode, r.size, r.mtime_ns, r.digest)
                for p, m, _ in built if m.kind == "deleted" and (r := recs.get(p)) is not None]
        if not gone:
            return built
        verdict = self.vol.guard.judge(gone, now, accept=self.vol.accept_local)
        if verdict.hold:
            self.schedule_review()
            metrics.held_deletions.labels(self.name).set(len(self.vol.guard.held))
            return [b for b in built if b[0] not in verdict.hold]
        return built

    def blobify(self, built: list[tuple[str, Manifest, FileStat | None]]) -> None:
        """Chunk lists too big for an etcd value (files of several GiB) are stored as a blob that peers
        fetch like file data; the manifest then carries only the blob's chunks and digest."""
        limit = self.ctx.max_manifest_bytes
        for _, m, _ in built:
            if m.kind == "file" and m.inline is None and len(m.chunks) * 44 > limit // 2 and len(m.encode()) > limit:
                data = json.dumps(m.chunks, separators=(",", ":")).encode()
                m.blob_digest, m.blob = localfs.write_blob(self.vol.base, data)

    async def publish(self, batch: list[tuple[str, Manifest, FileStat | None]],
                       recs: dict[str, FileRecord]) -> None:
        items = [(p, m.encode(), r.rev if (r := recs.get(p)) else 0) for p, m, _ in batch]
        ok, rev = await self.cas(items)
        if ok:
            self.published(batch, rev)
            return
        for one, item in zip(batch, items, strict=True):  # someone else changed one of them: find which
            ok, rev = await self.cas([item])
            if ok:
                self.published([one], rev)
            else:
                await self.vol.conflicts.settle(one[0], one[1], one[2])

    async def cas(self, items: list[tuple[str, bytes, int]]) -> tuple[bool, int]:
        """Every publish to the volume: compare-and-swap of manifests (path, value, base revision),
        rewriting the volume's head key in the same transaction (how `latest_revision` knows the latest
        change without a range read)."""
        return await self.store.publish(self.name, items)

    def published(self, batch: list[tuple[str, Manifest, FileStat | None]], rev: int) -> None:
        self.state.put_files(record_of(self.name, p, m, fs, rev) for p, m, fs in batch)
        for _, m, _ in batch:
            if m.blob:
                self.state.put_blob(self.name, m.blob_digest, m.blob)
        for _, m, _ in batch:
            metrics.ops_published.labels(m.kind).inc()
            if m.kind == "deleted":
                self.vol.tombstones_seen += 1
        self.vol.status.published += len(batch)
        self.ctx.emit("published", {"volume": self.name, "count": len(batch), "revision": rev,
                                    "paths": [p for p, _, _ in batch[:20]]})
